//! Snapshots: a cache saved as a GGUF file by our own writer and loaded back by our own
//! reader, so that attention after loading is bit for bit what it was.
//!
//! Metadata holds the config (`kvbits.cache.*`, formats by name); tensors hold, per layer `l`,
//! `kv.{l}.state` (I64: tokens, residual tokens, spans, open text), `kv.{l}.blocks` (I64
//! `[6, n_blocks]`: first, tokens, span, modality, K id, V id), `kv.{l}.runs` (I64 `[4, n_runs]`:
//! span, modality, tokens, salient), `kv.{l}.saliency` (F32, one per residual token) and per
//! KV head `g`: `kv.{l}.{g}.at` (I64 `[6, n_blocks]`: K offset, codes, meta, then V's),
//! `kv.{l}.{g}.k`/`.v` (the block arenas) and `.k_res`/`.v_res` (the f16 residual), as I8.
//!
//! A checksum over every metadata value and tensor catches damage; on top of it, every count,
//! offset and size is checked against the config and the formats' block sizes before anything
//! is trusted, so a file that is not what `save` wrote is an error, never a panic later.

use std::collections::HashMap;
use std::path::Path;

use super::{Block, BlockTokens, CacheConfig, Head, KvCache, Layer, Modality, Run, Stored};
use crate::Error;
use crate::gguf::{GgmlType, Gguf, GgufError, GgufFile, GgufWriter, MetaValue, TensorInfo};
use crate::kv::{BlockSize, FormatId, QuantParams, Role, Shape};

/// `general.architecture` of a snapshot.
const ARCH: &str = "kvbits-cache";
/// Layout version, bumped whenever the tensors or keys change meaning.
const VERSION: u32 = 2;
const CHECKSUM_KEY: &str = "kvbits.cache.checksum";
/// Tensors per layer besides the heads', and per head.
const LAYER_TENSORS: usize = 4;
const HEAD_TENSORS: usize = 5;

fn key(name: &str) -> String {
    format!("kvbits.cache.{name}")
}

/// A 64-bit multiply-xor hash a word at a time (FNV-1a's prime, then a shift that folds the
/// high bits down: a multiply alone carries a difference only upwards, so two flips of the top
/// bit of two words would cancel). Any single damaged word changes it, and it runs at memory
/// speed. Not a defence against a forger.
struct Checksum(u64);

impl Checksum {
    fn new() -> Checksum {
        Checksum(0xCBF2_9CE4_8422_2325)
    }

    fn word(&mut self, w: u64) {
        let h = (self.0 ^ w).wrapping_mul(0x0000_0100_0000_01B3);
        self.0 = h ^ (h >> 29);
    }

    fn bytes(&mut self, b: &[u8]) {
        self.word(b.len() as u64);
        let mut words = b.chunks_exact(8);
        for w in &mut words {
            self.word(u64::from_le_bytes(w.try_into().expect("8 bytes")));
        }
        let mut last = [0u8; 8];
        last[..words.remainder().len()].copy_from_slice(words.remainder());
        self.word(u64::from_le_bytes(last));
    }

    fn meta(&mut self, key: &str, value: &MetaValue) {
        self.bytes(key.as_bytes());
        // Debug prints floats exactly (shortest round trip), so this is the value's identity.
        self.bytes(format!("{value:?}").as_bytes());
    }

    fn tensor(&mut self, name: &str, ty: &GgmlType, dims: &[u64], data: &[u8]) {
        self.bytes(name.as_bytes());
        self.word(ty.id.into());
        dims.iter().for_each(|&d| self.word(d));
        self.bytes(data);
    }
}

/// A writer that checksums what it is given.
struct Out {
    w: GgufWriter,
    sum: Checksum,
}

impl Out {
    fn meta(&mut self, key: &str, value: MetaValue) -> Result<(), Error> {
        self.sum.meta(key, &value);
        self.w.add(key, value)?;
        Ok(())
    }

    fn tensor(&mut self, name: &str, ty: &str, dims: &[u64], data: Vec<u8>) -> Result<(), Error> {
        let ty = GgmlType::from_name(ty).expect("snapshot tensor types exist");
        self.sum.tensor(name, ty, dims, &data);
        self.w.add_tensor(name, ty, dims, data)?;
        Ok(())
    }

    /// A table of `N` i64 columns per row, as I64 `[N, rows]`.
    fn table<const N: usize>(
        &mut self,
        name: &str,
        rows: impl ExactSizeIterator<Item = [u64; N]>,
    ) -> Result<(), Error> {
        let n = rows.len() as u64;
        let data = rows.flatten().flat_map(u64::to_le_bytes).collect();
        self.tensor(name, "I64", &[N as u64, n], data)
    }

    fn bytes(&mut self, name: &str, data: &[u8]) -> Result<(), Error> {
        self.tensor(name, "I8", &[data.len() as u64], data.to_vec())
    }
}

fn modality_id(m: Modality) -> u64 {
    match m {
        Modality::Text => 0,
        Modality::Visual => 1,
    }
}

impl KvCache {
    /// Saves the cache to `path` (see the module docs for the layout).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), Error> {
        self.save_with(path, Vec::new())
    }

    /// [`KvCache::save`] with `extra` metadata of the caller's (covered by the checksum, read
    /// back from the parsed file). The file is written beside `path`, then renamed over it, so
    /// a failed save never leaves a half-written snapshot at `path`.
    pub fn save_with(
        &self,
        path: impl AsRef<Path>,
        extra: Vec<(String, MetaValue)>,
    ) -> Result<(), Error> {
        let path = path.as_ref();
        let mut name = path.file_name().unwrap_or_default().to_owned();
        name.push(".partial");
        let tmp = path.with_file_name(name);
        let out = self.snapshot(extra)?;
        let written = out.write_file(&tmp).and_then(|()| {
            std::fs::rename(&tmp, path).map_err(|source| Error::Io {
                path: path.into(),
                source,
            })
        });
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }

    /// The snapshot as a GGUF writer.
    pub fn snapshot(&self, extra: Vec<(String, MetaValue)>) -> Result<GgufWriter, Error> {
        let mut out = Out {
            w: GgufWriter::new(),
            sum: Checksum::new(),
        };
        for (k, v) in config_meta(&self.cfg).into_iter().chain(extra) {
            out.meta(&k, v)?;
        }
        for (l, lay) in self.layers.iter().enumerate() {
            let state = [lay.n_tokens, lay.n_res, lay.n_spans, lay.open_text as usize];
            out.table(
                &format!("kv.{l}.state"),
                [state.map(|x| x as u64)].into_iter(),
            )?;
            out.table(
                &format!("kv.{l}.blocks"),
                lay.blocks.iter().map(|b| {
                    let (first, n, span) = (b.first as u64, b.n_tokens as u64, b.span as u64);
                    [
                        first,
                        n,
                        span,
                        modality_id(b.modality),
                        b.k as u64,
                        b.v as u64,
                    ]
                }),
            )?;
            out.table(
                &format!("kv.{l}.runs"),
                lay.runs.iter().map(|r| {
                    [
                        r.span as u64,
                        modality_id(r.modality),
                        r.n as u64,
                        r.salient as u64,
                    ]
                }),
            )?;
            let sal = lay.saliency.iter().flat_map(|s| s.to_le_bytes()).collect();
            out.tensor(&format!("kv.{l}.saliency"), "F32", &[lay.n_res as u64], sal)?;
            for (g, h) in lay.heads.iter().enumerate() {
                out.table(
                    &format!("kv.{l}.{g}.at"),
                    h.at.iter().map(|s| {
                        [s.k_off, s.k.codes, s.k.meta, s.v_off, s.v.codes, s.v.meta]
                            .map(|x| x as u64)
                    }),
                )?;
                out.bytes(&format!("kv.{l}.{g}.k"), &h.k)?;
                out.bytes(&format!("kv.{l}.{g}.v"), &h.v)?;
                out.bytes(&format!("kv.{l}.{g}.k_res"), &h.k_res)?;
                out.bytes(&format!("kv.{l}.{g}.v_res"), &h.v_res)?;
            }
        }
        let sum = out.sum.0;
        out.w.add(CHECKSUM_KEY, sum)?;
        Ok(out.w)
    }

    /// Loads a snapshot written by [`KvCache::save`].
    pub fn load(path: impl AsRef<Path>) -> Result<KvCache, Error> {
        let file = GgufFile::open(path.as_ref())?;
        KvCache::from_snapshot(&file.parse()?).map_err(|e| match e {
            Error::Gguf(g) => Error::Gguf(g.in_file(path.as_ref())),
            e => e,
        })
    }

    /// The cache a parsed snapshot holds, after checking its checksum and every count, offset
    /// and size in it.
    pub fn from_snapshot(g: &Gguf<'_>) -> Result<KvCache, Error> {
        let arch = g.get("general.architecture").and_then(|v| v.as_str());
        if arch != Some(ARCH) {
            return Err(bad_key(
                "general.architecture",
                format!("is {arch:?}, not \"{ARCH}\": this is not a kvbits cache snapshot"),
            ));
        }
        let version = Meta(g).int("version")?;
        if version != VERSION as u64 {
            return Err(bad_key(
                &key("version"),
                format!("snapshot layout {version}; this kvbits reads layout {VERSION}"),
            ));
        }
        check_sum(g)?;
        let cfg = read_config(g)?;
        let n_layer = cfg.n_layer;
        let hk = cfg.n_head_kv;
        let want = hk
            .checked_mul(HEAD_TENSORS)
            .and_then(|h| h.checked_add(LAYER_TENSORS))
            .and_then(|per| per.checked_mul(n_layer));
        if want != Some(g.tensors().len()) {
            return Err(bad_key(
                &key("n_layer"),
                format!(
                    "{n_layer} layers of {hk} KV heads need {LAYER_TENSORS} + {HEAD_TENSORS} x \
                     {hk} tensors each, the file has {} tensors",
                    g.tensors().len()
                ),
            ));
        }
        let t = Tensors {
            g,
            by_name: g.tensors().iter().map(|t| (t.name, t)).collect(),
        };
        let layers = (0..n_layer)
            .map(|l| read_layer(&t, &cfg, l))
            .collect::<Result<_, _>>()?;
        Ok(KvCache {
            cfg,
            layers,
            scratch: Default::default(),
        })
    }
}

fn bad_key(key: &str, problem: impl Into<String>) -> Error {
    GgufError::Metadata {
        key: key.to_owned(),
        problem: problem.into(),
    }
    .into()
}

fn bad_tensor(tensor: &str, problem: impl Into<String>) -> Error {
    GgufError::Tensor {
        tensor: tensor.to_owned(),
        problem: problem.into(),
    }
    .into()
}

fn check_sum(g: &Gguf<'_>) -> Result<(), Error> {
    let mut sum = Checksum::new();
    let mut stored = None;
    for (k, v) in g.metadata() {
        if *k == CHECKSUM_KEY {
            stored = match v.to_owned() {
                MetaValue::U64(s) => Some(s),
                _ => None,
            };
        } else {
            sum.meta(k, &v.to_owned());
        }
    }
    for t in g.tensors() {
        sum.tensor(t.name, t.ty, &t.dims, g.tensor_data(t));
    }
    match stored {
        None => Err(bad_key(CHECKSUM_KEY, "missing or not a u64")),
        Some(s) if s != sum.0 => Err(bad_key(
            CHECKSUM_KEY,
            "does not match the contents: the snapshot is damaged; save the cache again",
        )),
        Some(_) => Ok(()),
    }
}

/// The config as metadata, in the order written.
fn config_meta(cfg: &CacheConfig) -> Vec<(String, MetaValue)> {
    let u = |n: usize| MetaValue::U64(n as u64);
    let name = |f: FormatId| MetaValue::from(f.name());
    let block_tokens = match cfg.block_tokens {
        BlockTokens::Fixed(n) => n,
        BlockTokens::All => 0,
    };
    let q = &cfg.quant;
    let mut meta = vec![("general.architecture".to_owned(), MetaValue::from(ARCH))];
    meta.extend(
        [
            ("version", MetaValue::U32(VERSION)),
            ("n_layer", u(cfg.n_layer)),
            ("n_head_kv", u(cfg.n_head_kv)),
            ("head_dim", u(cfg.head_dim)),
            ("type_k_text", name(cfg.k_text)),
            ("type_v_text", name(cfg.v_text)),
            ("type_k_visual", name(cfg.k_visual)),
            ("type_v_visual", name(cfg.v_visual)),
            ("block_tokens", u(block_tokens)),
            ("calib_alpha_k", MetaValue::F32(q.calib_alpha_k)),
            ("calib_alpha_v", MetaValue::F32(q.calib_alpha_v)),
            ("mix_fraction", MetaValue::F32(q.mix_fraction)),
            ("had_clip", MetaValue::F32(q.had_clip)),
            ("calibrate", MetaValue::Bool(cfg.calibrate)),
            ("calib_delta", MetaValue::F32(cfg.calib_delta)),
            ("protect_fraction", MetaValue::F32(cfg.protect_fraction)),
            (
                "pivot_factor",
                MetaValue::F32(cfg.pivot_factor.unwrap_or(0.0)),
            ),
            ("recent_f16", u(cfg.recent_f16)),
        ]
        .into_iter()
        .map(|(k, v)| (key(k), v)),
    );
    meta
}

/// Typed reads of `kvbits.cache.*` keys, with errors that name the key.
struct Meta<'g, 'a>(&'g Gguf<'a>);

impl Meta<'_, '_> {
    fn get(&self, name: &str, what: &str) -> Result<MetaValue, Error> {
        self.0
            .get(&key(name))
            .map(|v| v.to_owned())
            .ok_or_else(|| bad_key(&key(name), format!("missing (expected {what})")))
    }

    fn int(&self, name: &str) -> Result<u64, Error> {
        match self.get(name, "an integer")? {
            MetaValue::U32(n) => Ok(n.into()),
            MetaValue::U64(n) => Ok(n),
            v => Err(bad_key(
                &key(name),
                format!("{v:?} is not an unsigned integer"),
            )),
        }
    }

    fn usize(&self, name: &str) -> Result<usize, Error> {
        let n = self.int(name)?;
        usize::try_from(n).map_err(|_| bad_key(&key(name), format!("{n} is too large")))
    }

    fn f32(&self, name: &str) -> Result<f32, Error> {
        match self.get(name, "a float")? {
            MetaValue::F32(x) => Ok(x),
            v => Err(bad_key(&key(name), format!("{v:?} is not an f32"))),
        }
    }

    fn format(&self, name: &str) -> Result<FormatId, Error> {
        match self.get(name, "a cache type name")? {
            MetaValue::String(s) => {
                FormatId::from_name(&s).map_err(|e| bad_key(&key(name), e.to_string()))
            }
            v => Err(bad_key(&key(name), format!("{v:?} is not a type name"))),
        }
    }
}

fn read_config(g: &Gguf<'_>) -> Result<CacheConfig, Error> {
    let m = Meta(g);
    let block_tokens = match m.usize("block_tokens")? {
        0 => BlockTokens::All,
        n => BlockTokens::Fixed(n),
    };
    let calibrate = match m.get("calibrate", "a bool")? {
        MetaValue::Bool(b) => b,
        v => return Err(bad_key(&key("calibrate"), format!("{v:?} is not a bool"))),
    };
    let pivot = m.f32("pivot_factor")?;
    let cfg = CacheConfig {
        n_layer: m.usize("n_layer")?,
        n_head_kv: m.usize("n_head_kv")?,
        head_dim: m.usize("head_dim")?,
        k_text: m.format("type_k_text")?,
        v_text: m.format("type_v_text")?,
        k_visual: m.format("type_k_visual")?,
        v_visual: m.format("type_v_visual")?,
        block_tokens,
        quant: QuantParams {
            calib_alpha_k: m.f32("calib_alpha_k")?,
            calib_alpha_v: m.f32("calib_alpha_v")?,
            mix_fraction: m.f32("mix_fraction")?,
            had_clip: m.f32("had_clip")?,
        },
        calibrate,
        calib_delta: m.f32("calib_delta")?,
        protect_fraction: m.f32("protect_fraction")?,
        pivot_factor: (pivot != 0.0).then_some(pivot),
        recent_f16: m.usize("recent_f16")?,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// The snapshot's tensors by name.
struct Tensors<'g, 'a> {
    g: &'g Gguf<'a>,
    by_name: HashMap<&'a str, &'g TensorInfo<'a>>,
}

impl<'a> Tensors<'_, 'a> {
    /// The data of tensor `name`, which must be of type `ty` with `ne0` values per row
    /// (`None`: one row of any length); returns the data and the row count.
    fn get(&self, name: &str, ty: &str, ne0: Option<u64>) -> Result<(&'a [u8], usize), Error> {
        let t = self
            .by_name
            .get(name)
            .ok_or_else(|| bad_tensor(name, "missing"))?;
        let rows = match (ne0, t.dims.as_slice()) {
            (None, [_]) => Some(1),
            (Some(n), [d0, d1]) if *d0 == n => usize::try_from(*d1).ok(),
            _ => None,
        };
        match rows {
            Some(rows) if t.ty.name == ty => Ok((self.g.tensor_data(t), rows)),
            _ => Err(bad_tensor(
                name,
                format!(
                    "is {} {:?}, expected {ty} with {} values per row",
                    t.ty.name,
                    t.dims,
                    ne0.map_or("any number of".into(), |n| n.to_string())
                ),
            )),
        }
    }

    /// The rows of an I64 table of `N` columns.
    fn table<const N: usize>(&self, name: &str) -> Result<Vec<[u64; N]>, Error> {
        let (data, _) = self.get(name, "I64", Some(N as u64))?;
        Ok(data
            .chunks_exact(8 * N)
            .map(|row| {
                std::array::from_fn(|i| {
                    u64::from_le_bytes(row[8 * i..8 * i + 8].try_into().expect("8 bytes"))
                })
            })
            .collect())
    }

    fn bytes(&self, name: &str) -> Result<Vec<u8>, Error> {
        Ok(self.get(name, "I8", None)?.0.to_vec())
    }
}

/// `x` as usize, or an error naming the tensor and the field.
fn idx(x: u64, tensor: &str, field: &str) -> Result<usize, Error> {
    usize::try_from(x).map_err(|_| bad_tensor(tensor, format!("{field} {x} is too large")))
}

fn modality(x: u64, tensor: &str) -> Result<Modality, Error> {
    match x {
        0 => Ok(Modality::Text),
        1 => Ok(Modality::Visual),
        _ => Err(bad_tensor(
            tensor,
            format!("modality {x} is neither 0 nor 1"),
        )),
    }
}

fn flag(x: u64, tensor: &str, field: &str) -> Result<bool, Error> {
    match x {
        0 | 1 => Ok(x == 1),
        _ => Err(bad_tensor(
            tensor,
            format!("{field} {x} is neither 0 nor 1"),
        )),
    }
}

fn read_layer(t: &Tensors<'_, '_>, cfg: &CacheConfig, l: usize) -> Result<Layer, Error> {
    let d = cfg.head_dim;
    let name = |s: &str| format!("kv.{l}.{s}");

    let tn = name("state");
    let &[[n_tokens, n_res, n_spans, open_text]] = t.table::<4>(&tn)?.as_slice() else {
        return Err(bad_tensor(&tn, "expected one row"));
    };
    let (n_tokens, n_res) = (idx(n_tokens, &tn, "tokens")?, idx(n_res, &tn, "residual")?);
    let n_spans = idx(n_spans, &tn, "spans")?;
    let open_text = flag(open_text, &tn, "open text")?;
    if n_res > n_tokens {
        return Err(bad_tensor(
            &tn,
            format!("{n_res} residual tokens of {n_tokens}"),
        ));
    }

    let tn = name("blocks");
    let mut blocks = Vec::new();
    let mut next = 0;
    for (i, [first, n, span, m, k, v]) in t.table::<6>(&tn)?.into_iter().enumerate() {
        let at = |field: &str| format!("block {i}: {field}");
        let modality = modality(m, &tn)?;
        let (first, n) = (idx(first, &tn, &at("first"))?, idx(n, &tn, &at("tokens"))?);
        let span = idx(span, &tn, &at("span"))?;
        if first != next || n == 0 || n > cfg.block_len() {
            return Err(bad_tensor(
                &tn,
                format!(
                    "{}: tokens {first}+{n}, expected to start at {next}",
                    at("range")
                ),
            ));
        }
        if span >= n_spans || blocks.last().is_some_and(|b: &Block| b.span > span) {
            return Err(bad_tensor(&tn, format!("{} out of order", at("span"))));
        }
        // A block holds its modality's format, or f16 where the format refused the values.
        let (kf, vf) = cfg.formats(modality);
        let format = |id: u64, want: FormatId| {
            i32::try_from(id)
                .ok()
                .and_then(FormatId::from_id)
                .filter(|&f| f == want || f == FormatId::F16)
                .ok_or_else(|| {
                    bad_tensor(
                        &tn,
                        format!("{}: type {id}, expected {want} or f16", at("type")),
                    )
                })
        };
        blocks.push(Block {
            first,
            n_tokens: n,
            span,
            modality,
            k: format(k, kf)?,
            v: format(v, vf)?,
        });
        next = first + n;
    }
    if next + n_res != n_tokens {
        return Err(bad_tensor(
            &tn,
            format!("blocks hold {next} tokens and the residual {n_res}, of {n_tokens}"),
        ));
    }

    let tn = name("runs");
    let mut runs: Vec<Run> = Vec::new();
    for (i, [span, m, n, salient]) in t.table::<4>(&tn)?.into_iter().enumerate() {
        let span = idx(span, &tn, "span")?;
        let after = runs
            .last()
            .map(|r| r.span + 1)
            .or(blocks.last().map(|b| b.span));
        if span >= n_spans || after.is_some_and(|a| span < a) {
            return Err(bad_tensor(
                &tn,
                format!("run {i}: span {span} out of order"),
            ));
        }
        let n = idx(n, &tn, "tokens")?;
        if n == 0 {
            return Err(bad_tensor(&tn, format!("run {i} is empty")));
        }
        runs.push(Run {
            span,
            modality: modality(m, &tn)?,
            n,
            salient: flag(salient, &tn, "salient")?,
        });
    }
    if runs.iter().map(|r| r.n).sum::<usize>() != n_res {
        return Err(bad_tensor(
            &tn,
            format!("runs do not add up to the {n_res} residual tokens"),
        ));
    }

    let tn = name("saliency");
    let (sal, _) = t.get(&tn, "F32", None)?;
    let saliency: Vec<f32> = sal
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect();
    if saliency.len() != n_res || saliency.iter().any(|s| !s.is_finite()) {
        return Err(bad_tensor(&tn, format!("expected {n_res} finite values")));
    }

    let heads = (0..cfg.n_head_kv)
        .map(|g| read_head(t, cfg, &blocks, n_res * d * 2, &format!("kv.{l}.{g}")))
        .collect::<Result<_, _>>()?;
    Ok(Layer {
        n_tokens,
        blocks,
        heads,
        runs,
        saliency,
        n_res,
        n_spans,
        open_text,
    })
}

fn read_head(
    t: &Tensors<'_, '_>,
    cfg: &CacheConfig,
    blocks: &[Block],
    res_bytes: usize,
    prefix: &str,
) -> Result<Head, Error> {
    let name = |s: &str| format!("{prefix}.{s}");
    let tn = name("at");
    let table = t.table::<6>(&tn)?;
    if table.len() != blocks.len() {
        return Err(bad_tensor(
            &tn,
            format!("{} rows for {} blocks", table.len(), blocks.len()),
        ));
    }
    let (mut k_end, mut v_end) = (0, 0);
    let mut at = Vec::with_capacity(table.len());
    for (i, (row, b)) in table.iter().zip(blocks).enumerate() {
        let [k_off, k_codes, k_meta, v_off, v_codes, v_meta] =
            row.map(|x| usize::try_from(x).unwrap_or(usize::MAX));
        let k = BlockSize {
            codes: k_codes,
            meta: k_meta,
        };
        let v = BlockSize {
            codes: v_codes,
            meta: v_meta,
        };
        let fits = |f: FormatId, role, size: BlockSize| {
            let shape = Shape {
                n: b.n_tokens,
                d: cfg.head_dim,
                role,
            };
            let most = if f.imp().protects() { b.n_tokens } else { 0 };
            (0..=most).any(|p| f.imp().block_size(shape, p, &cfg.quant) == size)
        };
        if k_off != k_end
            || v_off != v_end
            || !fits(b.k, Role::Key, k)
            || !fits(b.v, Role::Value, v)
        {
            return Err(bad_tensor(
                &tn,
                format!(
                    "block {i}: offsets or sizes are not those of its {}/{} block",
                    b.k, b.v
                ),
            ));
        }
        k_end += k.total();
        v_end += v.total();
        at.push(Stored { k_off, k, v_off, v });
    }
    let arena = |s: &str, len: usize| {
        let tn = name(s);
        let bytes = t.bytes(&tn)?;
        if bytes.len() != len {
            return Err(bad_tensor(
                &tn,
                format!("{} bytes, expected {len}", bytes.len()),
            ));
        }
        Ok(bytes)
    };
    let residual = |s: &str| {
        let bytes = arena(s, res_bytes)?;
        // f16 with an all-ones exponent: infinity or NaN, which no append lets in.
        if bytes.chunks_exact(2).any(|h| h[1] & 0x7C == 0x7C) {
            return Err(bad_tensor(&name(s), "holds a non-finite value"));
        }
        Ok(bytes)
    };
    Ok(Head {
        k: arena("k", k_end)?,
        v: arena("v", v_end)?,
        at,
        k_res: residual("k_res")?,
        v_res: residual("v_res")?,
    })
}
