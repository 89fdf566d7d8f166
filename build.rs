//! Without the `cuda` feature: nothing. With it: compile `csrc/` with nvcc (through the cc
//! crate) for sm_80, sm_86, sm_89 and sm_90 plus PTX, link static cudart, and generate the Rust
//! declarations of `csrc/kvbits_cuda.h` with bindgen.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    cuda::build();
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::env;
    use std::path::{Path, PathBuf};

    /// nvcc from $NVCC, $CUDA_HOME/bin or $PATH, and the toolkit root it belongs to.
    fn find_nvcc() -> (PathBuf, PathBuf) {
        for var in ["NVCC", "CUDA_HOME", "CUDA_PATH"] {
            println!("cargo:rerun-if-env-changed={var}");
        }
        let candidates = [
            env::var_os("NVCC").map(PathBuf::from),
            env::var_os("CUDA_HOME").map(|h| Path::new(&h).join("bin/nvcc")),
            env::var_os("CUDA_PATH").map(|h| Path::new(&h).join("bin/nvcc")),
            env::var_os("PATH").and_then(|paths| {
                env::split_paths(&paths)
                    .map(|p| p.join("nvcc"))
                    .find(|p| p.is_file())
            }),
        ];
        let nvcc = candidates
            .into_iter()
            .flatten()
            .find(|p| p.is_file())
            .unwrap_or_else(|| {
                panic!(
                    "kvbits: the `cuda` feature needs nvcc (CUDA 12.x or 13.x). Install the pinned \
                 toolkit from PyPI and point CUDA_HOME at it:\n    \
                 export CUDA_HOME=$(scripts/install-cuda.sh)\n\
                 or set NVCC to the compiler's path."
                )
            });
        let nvcc = nvcc.canonicalize().unwrap_or(nvcc);
        let home = nvcc
            .parent()
            .and_then(Path::parent)
            .expect("nvcc sits in <root>/bin")
            .into();
        (nvcc, home)
    }

    pub fn build() {
        let (nvcc, home) = find_nvcc();
        // cc takes nvcc from $NVCC (else from PATH).
        // SAFETY: the build script is single-threaded at this point.
        unsafe { env::set_var("NVCC", &nvcc) };
        // kernels.cu includes every format's csrc/<name>.cu, so the fused kernels inline them.
        let sources = ["csrc/runtime.cu", "csrc/kernels.cu", "csrc/cache.cu"];
        println!("cargo:rerun-if-changed=csrc");
        let mut build = cc::Build::new();
        build
            .cuda(true)
            .cudart("static")
            .include("csrc")
            // Device code is always optimised: -G would make every debug build's kernels
            // unusably slow; -lineinfo keeps profiles readable.
            .debug(false)
            .opt_level(3)
            .flag("-std=c++20")
            .flag("-lineinfo")
            .flag("--expt-relaxed-constexpr")
            .flag("-Xptxas=-warn-spills");
        // KVBITS_CUDA_ARCHS="90" builds one target, for quick builds aimed at a known GPU.
        println!("cargo:rerun-if-env-changed=KVBITS_CUDA_ARCHS");
        let archs = env::var("KVBITS_CUDA_ARCHS").unwrap_or_else(|_| "80;86;89;90".into());
        let archs: Vec<&str> = archs
            .split([';', ','])
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .collect();
        for sm in &archs {
            build.flag(format!("-gencode=arch=compute_{sm},code=sm_{sm}"));
        }
        // PTX of the newest target, for GPUs newer than this list.
        if let Some(newest) = archs.iter().max() {
            build.flag(format!(
                "-gencode=arch=compute_{newest},code=compute_{newest}"
            ));
        }
        build.files(&sources).compile("kvbits_cuda");

        let lib = ["lib64", "lib"]
            .iter()
            .map(|d| home.join(d))
            .find(|d| d.is_dir());
        if let Some(lib) = lib {
            println!("cargo:rustc-link-search=native={}", lib.display());
        }
        println!("cargo:rustc-link-lib=static=cudart_static");
        for lib in ["stdc++", "dl", "rt", "pthread"] {
            println!("cargo:rustc-link-lib=dylib={lib}");
        }

        println!("cargo:rerun-if-changed=csrc/kvbits_cuda.h");
        let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        bindgen::Builder::default()
            .header("csrc/kvbits_cuda.h")
            .allowlist_function("kvb_cuda_.*")
            .allowlist_type("kvb_cuda_.*")
            .allowlist_var("KVB_CUDA_.*")
            .default_enum_style(bindgen::EnumVariation::Consts)
            .generate()
            .expect(
                "bindgen could not parse csrc/kvbits_cuda.h: it needs libclang \
                 (apt-get install libclang-dev)",
            )
            .write_to_file(out.join("cuda_sys.rs"))
            .expect("OUT_DIR is writable");
    }
}
