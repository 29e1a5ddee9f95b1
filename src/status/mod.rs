//! The `/status` document: what the health endpoint serves and what `ferryd status`, `upgrade`
//! and `doctor` read (the operator commands). This module owns only the format.

pub mod document;

pub use document::StatusDocument;
