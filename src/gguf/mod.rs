//! GGUF: a zero-copy reader over a memory map, and a writer.
//!
//! ```no_run
//! let file = kvbits::gguf::GgufFile::open("model.gguf")?;
//! let gguf = file.parse()?;
//! println!("{:?}", gguf.get("general.architecture"));
//! # Ok::<(), kvbits::Error>(())
//! ```

mod error;
mod reader;
mod types;
mod value;
mod writer;

pub use error::GgufError;
pub use reader::{DEFAULT_ALIGNMENT, Gguf, GgufFile, MAX_ALIGNMENT, MAX_DIMS, TensorInfo};
pub use types::{GGML_TYPES, GgmlType};
pub use value::{Array, MetaValue, Value, ValueType};
pub use writer::GgufWriter;
