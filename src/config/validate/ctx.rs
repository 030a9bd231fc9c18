//! The error collector of validation: every error with its file, line and
//! field, all reported at once. A leaf of `validate`: the files that read
//! the config use it, it uses none of them.

use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use toml::Spanned;

use crate::config::{parse_duration, ConfigError, Origin};

/// Collects errors with their line numbers.
pub(in crate::config) struct Ctx<'a> {
    pub(super) file: &'a Path,
    pub(super) text: &'a str,
    pub(super) errors: Vec<ConfigError>,
}

impl Ctx<'_> {
    pub(super) fn line_of(&self, span: &Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    pub(in crate::config) fn origin(&self, span: &Range<usize>, field: &str) -> Origin {
        Origin {
            file: self.file.to_path_buf(),
            line: self.line_of(span),
            field: field.to_string(),
        }
    }

    pub(in crate::config) fn err(
        &mut self,
        span: &Range<usize>,
        field: &str,
        message: impl Into<String>,
    ) {
        let origin = self.origin(span, field);
        self.errors.push(ConfigError {
            origin,
            message: message.into(),
        });
    }

    pub(super) fn duration(
        &mut self,
        v: &Option<Spanned<String>>,
        field: &str,
        default: Duration,
    ) -> Duration {
        let Some(v) = v else { return default };
        match parse_duration(v.get_ref()) {
            Ok(d) if d.is_zero() => {
                self.err(&v.span(), field, "must be greater than zero");
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.err(&v.span(), field, e);
                default
            }
        }
    }

    pub(super) fn count(
        &mut self,
        v: &Option<Spanned<i64>>,
        field: &str,
        min: i64,
        max: i64,
        default: usize,
    ) -> usize {
        let Some(v) = v else { return default };
        let n = *v.get_ref();
        if n < min || n > max {
            self.err(
                &v.span(),
                field,
                format!("{n} is out of range; use a value from {min} to {max}"),
            );
            return default;
        }
        n as usize
    }
}
