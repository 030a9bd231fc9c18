//! Where a configuration value came from, so an error found later (by the
//! certificate store, the ACME manager) names the file, line and field. A
//! leaf: it imports nothing from the rest of the config.

use std::fmt;
use std::path::PathBuf;

/// Where a configuration value came from: used to point errors found later
/// (for example by the certificate store) at the right line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The configuration file.
    pub file: PathBuf,
    /// 1-based line; 0 when the value did not come from a file.
    pub line: usize,
    /// Dotted field path, e.g. `sites[0].tls.cert`.
    pub field: String,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.field)
        } else {
            write!(f, "{}:{}: {}", self.file.display(), self.line, self.field)
        }
    }
}
