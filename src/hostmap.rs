//! Name lookup shared by the SNI resolver and the HTTP router: exact name,
//! then single-label wildcard, then the default.
//!
//! Hot path: one hash lookup per step, no allocation unless the name has
//! upper-case letters.

use std::collections::HashMap;

use crate::config::HostPattern;

/// Values keyed by host pattern.
#[derive(Debug, Clone)]
pub struct HostMap<T> {
    /// `api.example.com` -> value.
    exact: HashMap<Box<str>, T>,
    /// `example.com` (from `*.example.com`) -> value.
    wildcard: HashMap<Box<str>, T>,
    /// Used when nothing else matches.
    default: Option<T>,
}

impl<T> Default for HostMap<T> {
    fn default() -> Self {
        HostMap {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            default: None,
        }
    }
}

impl<T: Clone> HostMap<T> {
    /// Adds `value` under `pattern`; returns false if the pattern was taken.
    pub fn insert(&mut self, pattern: &HostPattern, value: T) -> bool {
        let (map, key) = match pattern {
            HostPattern::Exact(h) => (&mut self.exact, h),
            HostPattern::Wildcard(s) => (&mut self.wildcard, s),
        };
        if map.contains_key(key.as_str()) {
            return false;
        }
        map.insert(key.as_str().into(), value);
        true
    }

    /// Sets the fallback value.
    pub fn set_default(&mut self, value: T) {
        self.default = Some(value);
    }

    /// The fallback value.
    pub fn default_value(&self) -> Option<&T> {
        self.default.as_ref()
    }

    /// Looks `name` up; `None` (no SNI, no Host) goes straight to the default.
    pub fn lookup(&self, name: Option<&str>) -> Option<&T> {
        if let Some(name) = name {
            let name = name.strip_suffix('.').unwrap_or(name);
            if let Some(v) = self.lookup_named(name) {
                return Some(v);
            }
        }
        self.default.as_ref()
    }

    /// Exact then wildcard, no default.
    pub fn lookup_named(&self, name: &str) -> Option<&T> {
        if name.bytes().any(|b| b.is_ascii_uppercase()) {
            return self.lookup_lower(&name.to_ascii_lowercase());
        }
        self.lookup_lower(name)
    }

    fn lookup_lower(&self, name: &str) -> Option<&T> {
        if let Some(v) = self.exact.get(name) {
            return Some(v);
        }
        let (_, parent) = name.split_once('.')?;
        self.wildcard.get(parent)
    }

    /// Number of names (exact + wildcard).
    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcard.len()
    }

    /// Whether no name is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> HostMap<u8> {
        let mut m = HostMap::default();
        m.insert(&HostPattern::Exact("api.example.com".into()), 1);
        m.insert(&HostPattern::Wildcard("example.com".into()), 2);
        m.set_default(3);
        m
    }

    #[test]
    fn exact_beats_wildcard_beats_default() {
        let m = map();
        assert_eq!(m.lookup(Some("api.example.com")), Some(&1));
        assert_eq!(m.lookup(Some("API.Example.COM.")), Some(&1));
        assert_eq!(m.lookup(Some("www.example.com")), Some(&2));
        assert_eq!(m.lookup(Some("a.b.example.com")), Some(&3));
        assert_eq!(m.lookup(Some("example.com")), Some(&3));
        assert_eq!(m.lookup(None), Some(&3));
    }

    #[test]
    fn no_default_means_no_match() {
        let mut m = HostMap::default();
        m.insert(&HostPattern::Exact("a.test".into()), 1u8);
        assert_eq!(m.lookup(Some("b.test")), None);
        assert_eq!(m.lookup(None), None);
    }
}
