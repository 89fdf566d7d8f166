//! ggml tensor types: one table, indexed by the type id stored in GGUF tensor infos.

/// One ggml tensor type: `block` values are stored in `bytes` bytes.
/// Ids ggml has retired keep their row with `block == 0`, so a file that uses one gets a
/// precise error rather than "unknown type".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GgmlType {
    pub id: u32,
    pub name: &'static str,
    pub block: u64,
    pub bytes: u64,
}

const fn t(id: u32, name: &'static str, block: u64, bytes: u64) -> GgmlType {
    GgmlType {
        id,
        name,
        block,
        bytes,
    }
}

/// Every id of current ggml, 0 to 42 (`ggml.h`; block layouts from `ggml-common.h`).
pub static GGML_TYPES: [GgmlType; 43] = [
    t(0, "F32", 1, 4),
    t(1, "F16", 1, 2),
    t(2, "Q4_0", 32, 18),
    t(3, "Q4_1", 32, 20),
    t(4, "Q4_2", 0, 0),
    t(5, "Q4_3", 0, 0),
    t(6, "Q5_0", 32, 22),
    t(7, "Q5_1", 32, 24),
    t(8, "Q8_0", 32, 34),
    t(9, "Q8_1", 32, 36),
    t(10, "Q2_K", 256, 84),
    t(11, "Q3_K", 256, 110),
    t(12, "Q4_K", 256, 144),
    t(13, "Q5_K", 256, 176),
    t(14, "Q6_K", 256, 210),
    t(15, "Q8_K", 256, 292),
    t(16, "IQ2_XXS", 256, 66),
    t(17, "IQ2_XS", 256, 74),
    t(18, "IQ3_XXS", 256, 98),
    t(19, "IQ1_S", 256, 50),
    t(20, "IQ4_NL", 32, 18),
    t(21, "IQ3_S", 256, 110),
    t(22, "IQ2_S", 256, 82),
    t(23, "IQ4_XS", 256, 136),
    t(24, "I8", 1, 1),
    t(25, "I16", 1, 2),
    t(26, "I32", 1, 4),
    t(27, "I64", 1, 8),
    t(28, "F64", 1, 8),
    t(29, "IQ1_M", 256, 56),
    t(30, "BF16", 1, 2),
    t(31, "Q4_0_4_4", 0, 0),
    t(32, "Q4_0_4_8", 0, 0),
    t(33, "Q4_0_8_8", 0, 0),
    t(34, "TQ1_0", 256, 54),
    t(35, "TQ2_0", 256, 66),
    t(36, "IQ4_NL_4_4", 0, 0),
    t(37, "IQ4_NL_4_8", 0, 0),
    t(38, "IQ4_NL_8_8", 0, 0),
    t(39, "MXFP4", 32, 17),
    t(40, "NVFP4", 64, 36),
    t(41, "Q1_0", 128, 18),
    t(42, "Q2_0", 64, 18),
];

impl GgmlType {
    /// The type with this id, retired ids included.
    pub fn from_id(id: u32) -> Option<&'static GgmlType> {
        GGML_TYPES.get(id as usize)
    }

    /// Look a type up by its ggml name, case-insensitively (`"q8_0"`, `"BF16"`).
    pub fn from_name(name: &str) -> Option<&'static GgmlType> {
        GGML_TYPES
            .iter()
            .find(|t| t.block != 0 && t.name.eq_ignore_ascii_case(name))
    }

    /// ggml no longer reads or writes this type.
    pub fn is_retired(&self) -> bool {
        self.block == 0
    }

    /// Bytes of a tensor of `n_elements` values whose first dimension is `ne0`;
    /// `None` when the row does not fill whole blocks or the size overflows.
    pub fn tensor_bytes(&self, ne0: u64, n_elements: u64) -> Option<u64> {
        if self.block == 0 || !ne0.is_multiple_of(self.block) {
            return None;
        }
        (n_elements / self.block).checked_mul(self.bytes)
    }
}
