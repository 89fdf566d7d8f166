//! A small `.npy` reader for KV dumps: format versions 1-3, little-endian f32 or f16,
//! C order. Every error names the file.

use std::path::Path;

use half::f16;

use crate::Error;

const MAGIC: &[u8] = b"\x93NUMPY";

/// An n-dimensional f32 array, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Read and parse `path`.
pub fn read(path: &Path) -> Result<Array, Error> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&bytes, path)
}

/// Parse the bytes of a `.npy` file; `path` only names it in errors.
pub fn parse(bytes: &[u8], path: &Path) -> Result<Array, Error> {
    let bad = |msg: String| Error::InvalidArgument(format!("{}: {msg}", path.display()));
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(bad("not a .npy file (no \\x93NUMPY magic)".into()));
    }
    let (header_len, start): (usize, usize) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => match bytes.get(8..12) {
            Some(b) => (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize, 12),
            None => return Err(bad("truncated header".into())),
        },
        v => return Err(bad(format!("unsupported .npy format version {v}"))),
    };
    let header = bytes
        .get(start..start.saturating_add(header_len))
        .ok_or_else(|| bad("header runs past the end of the file".into()))?;
    let header = std::str::from_utf8(header).map_err(|_| bad("header is not UTF-8".into()))?;
    let h = Header::parse(header).map_err(|e| bad(format!("malformed header ({e}): {header}")))?;
    let item = match h.descr.as_str() {
        "<f4" => 4,
        "<f2" => 2,
        d => {
            return Err(Error::Unsupported(format!(
                "{}: dtype '{d}' (expected little-endian float32 '<f4' or float16 '<f2'; \
                 convert with arr.astype(np.float32))",
                path.display()
            )));
        }
    };
    if h.fortran_order {
        return Err(Error::Unsupported(format!(
            "{}: Fortran-order array (save a C-order copy: np.save(f, np.ascontiguousarray(a)))",
            path.display()
        )));
    }
    let count = h
        .shape
        .iter()
        .try_fold(1usize, |n, &s| n.checked_mul(s))
        .ok_or_else(|| bad(format!("shape {:?} overflows", h.shape)))?;
    let body = &bytes[start + header_len..];
    if Some(body.len()) != count.checked_mul(item) {
        return Err(bad(format!(
            "shape {:?} of {item}-byte values needs {} data bytes, the file has {}",
            h.shape,
            count.saturating_mul(item),
            body.len()
        )));
    }
    let data = if item == 4 {
        body.chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    } else {
        body.chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect()
    };
    Ok(Array {
        shape: h.shape,
        data,
    })
}

/// The three keys of a `.npy` header dict.
struct Header {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

/// A value of the header dict: the Python literal subset numpy writes.
enum Lit {
    Str(String),
    Bool(bool),
    Tuple(Vec<usize>),
}

impl Header {
    fn parse(s: &str) -> Result<Header, String> {
        let mut p = Lexer {
            s: s.as_bytes(),
            i: 0,
        };
        let (mut descr, mut fortran, mut shape) = (None, None, None);
        p.expect(b'{')?;
        while !p.eat(b'}') {
            let key = match p.literal()? {
                Lit::Str(k) => k,
                _ => return Err("dict key is not a string".into()),
            };
            p.expect(b':')?;
            match (key.as_str(), p.literal()?) {
                ("descr", Lit::Str(d)) => descr = Some(d),
                ("fortran_order", Lit::Bool(b)) => fortran = Some(b),
                ("shape", Lit::Tuple(t)) => shape = Some(t),
                ("descr" | "fortran_order" | "shape", _) => {
                    return Err(format!("'{key}' has the wrong type"));
                }
                _ => {}
            }
            if !p.eat(b',') {
                p.expect(b'}')?;
                break;
            }
        }
        Ok(Header {
            descr: descr.ok_or("no 'descr'")?,
            fortran_order: fortran.ok_or("no 'fortran_order'")?,
            shape: shape.ok_or("no 'shape'")?,
        })
    }
}

struct Lexer<'a> {
    s: &'a [u8],
    i: usize,
}

impl Lexer<'_> {
    fn skip_ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    /// Consume `c` (after whitespace) if it is next.
    fn eat(&mut self, c: u8) -> bool {
        self.skip_ws();
        let hit = self.s.get(self.i) == Some(&c);
        self.i += hit as usize;
        hit
    }

    fn expect(&mut self, c: u8) -> Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!("expected '{}' at byte {}", c as char, self.i))
        }
    }

    fn literal(&mut self) -> Result<Lit, String> {
        self.skip_ws();
        let rest = &self.s[self.i..];
        match rest.first() {
            Some(&q @ (b'\'' | b'"')) => {
                let len = rest[1..]
                    .iter()
                    .position(|&c| c == q)
                    .ok_or("unterminated string")?;
                self.i += len + 2;
                Ok(Lit::Str(String::from_utf8_lossy(&rest[1..1 + len]).into()))
            }
            Some(b'(') => {
                self.i += 1;
                let mut t = Vec::new();
                while !self.eat(b')') {
                    t.push(self.int()?);
                    if !self.eat(b',') {
                        self.expect(b')')?;
                        break;
                    }
                }
                Ok(Lit::Tuple(t))
            }
            _ if rest.starts_with(b"True") => {
                self.i += 4;
                Ok(Lit::Bool(true))
            }
            _ if rest.starts_with(b"False") => {
                self.i += 5;
                Ok(Lit::Bool(false))
            }
            _ => Err(format!("unexpected value at byte {}", self.i)),
        }
    }

    fn int(&mut self) -> Result<usize, String> {
        self.skip_ws();
        let digits = self.s[self.i..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        let text = std::str::from_utf8(&self.s[self.i..self.i + digits]).unwrap_or("");
        let v = text
            .parse()
            .map_err(|_| format!("expected a dimension at byte {}", self.i))?;
        self.i += digits;
        // Python 2 wrote long integers as `3L`.
        self.i += (self.s.get(self.i) == Some(&b'L')) as usize;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A .npy file written byte by byte: magic, version, header length, header, data.
    fn file(version: u8, header: &str, data: &[u8]) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        b.extend([version, 0]);
        if version == 1 {
            b.extend((header.len() as u16).to_le_bytes());
        } else {
            b.extend((header.len() as u32).to_le_bytes());
        }
        b.extend(header.as_bytes());
        b.extend(data);
        b
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn p() -> &'static Path {
        Path::new("x.npy")
    }

    #[test]
    fn reads_f32_v1_and_v3() {
        let v = [1.0f32, -2.5, 3.25, 0.0, 1e-3, 7.0];
        for ver in [1, 2, 3] {
            let h = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }      \n";
            let a = parse(&file(ver, h, &f32_bytes(&v)), p()).unwrap();
            assert_eq!(a.shape, vec![2, 3]);
            assert_eq!(a.data, v);
        }
    }

    #[test]
    fn reads_f16_and_odd_spacing() {
        let v = [1.0f32, -0.5, 65504.0];
        let bytes: Vec<u8> = v
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_le_bytes())
            .collect();
        let h = "{\"shape\":(3,),\"fortran_order\":False,\"descr\":\"<f2\"}";
        let a = parse(&file(1, h, &bytes), p()).unwrap();
        assert_eq!(a.shape, vec![3]);
        assert_eq!(a.data, v);
    }

    fn err(bytes: &[u8]) -> String {
        parse(bytes, p()).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let data = f32_bytes(&[0.0; 4]);
        let e = err(&file(
            1,
            "{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }",
            &data,
        ));
        assert!(e.contains("x.npy") && e.contains("'<f8'"), "{e}");
        let e = err(&file(
            1,
            "{'descr': '>f4', 'fortran_order': False, 'shape': (4,), }",
            &data,
        ));
        assert!(e.contains("'>f4'"), "{e}");
        let e = err(&file(
            1,
            "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }",
            &data,
        ));
        assert!(e.contains("x.npy") && e.contains("Fortran"), "{e}");
        let e = err(&file(
            1,
            "{'descr': '<f4', 'fortran_order': False, 'shape': (5,), }",
            &data,
        ));
        assert!(e.contains("20 data bytes") && e.contains("has 16"), "{e}");
        let e = err(&file(1, "{'descr': '<f4', 'shape': (4,), }", &data));
        assert!(e.contains("fortran_order"), "{e}");
        let e = err(b"PK\x03\x04 not numpy");
        assert!(e.contains("x.npy") && e.contains("magic"), "{e}");
        let e = err(&file(
            9,
            "{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }",
            &data,
        ));
        assert!(e.contains("version 9"), "{e}");
        let mut short = file(
            1,
            "{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }",
            &data,
        );
        short.truncate(30);
        assert!(err(&short).contains("past the end"));
        assert!(err(b"\x93NUMPY\x02\x00\x10\x00").contains("truncated"));
    }

    #[test]
    fn reads_a_file_from_disk() {
        let path = std::env::temp_dir().join(format!("kvbits-npy-{}.npy", std::process::id()));
        let v = [3.0f32, 4.0];
        let h = "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2), }";
        std::fs::write(&path, file(1, h, &f32_bytes(&v))).unwrap();
        let a = read(&path);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(a.unwrap().data, v);
        let e = read(Path::new("/nonexistent/k.npy"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/k.npy"), "{e}");
    }
}
