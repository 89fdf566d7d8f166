//! `kvbits eval`: fidelity and memory of cache types (being written).
