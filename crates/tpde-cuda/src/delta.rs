//! Mapping of `tpde` delta files onto the loader (phase 2).
