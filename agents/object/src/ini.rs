//! A writer of the ini files Swift's servers read (Python's `ConfigParser` through
//! paste.deploy): sections of `key = value` lines, where a value is refused rather than
//! escaped when it could end its line, start another section or be interpolated.

use std::fmt::Write as _;

/// A value or name that cannot be written safely.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?}: {reason}")]
pub struct IniError {
    /// What it is (`section`, `key` or the key whose value it is).
    pub what: String,
    /// The value refused.
    pub value: String,
    /// Why.
    pub reason: &'static str,
}

/// An ini document, written section by section.
#[derive(Debug, Default, Clone)]
pub struct Ini {
    text: String,
}

/// A name (section or key): letters, digits, `_`, `-`, `.`, `:` and `#` after the first
/// character only in sections (`app:object-server`, `filter:recon`).
fn check_name(what: &str, name: &str, section: bool) -> Result<(), IniError> {
    let err = |reason| IniError {
        what: what.into(),
        value: name.into(),
        reason,
    };
    if name.is_empty() || name.len() > 64 {
        return Err(err("must have 1 to 64 characters"));
    }
    let ok = name.bytes().all(|b| {
        b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.') || (section && b == b':')
    });
    if !ok {
        return Err(err(
            "may hold only letters, digits, '_', '-', '.' (and ':' in a section)",
        ));
    }
    Ok(())
}

/// A value: one line, no interpolation, no surrounding blanks ConfigParser would strip.
fn check_value(key: &str, value: &str) -> Result<(), IniError> {
    let err = |reason| IniError {
        what: key.into(),
        value: value.into(),
        reason,
    };
    if value.len() > 4096 {
        return Err(err("is longer than 4096 bytes"));
    }
    if value.chars().any(char::is_control) {
        return Err(err("holds a line break or another control character"));
    }
    if value.contains('%') {
        return Err(err(
            "holds '%', which the configuration loader interpolates",
        ));
    }
    if value.trim() != value {
        return Err(err("starts or ends with a blank"));
    }
    if value.starts_with(['#', ';', '[']) {
        return Err(err("starts with a comment or section character"));
    }
    Ok(())
}

impl Ini {
    /// An empty document.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts section `name`.
    ///
    /// # Errors
    /// A name that is not a plain section name.
    pub fn section(&mut self, name: &str) -> Result<&mut Self, IniError> {
        check_name("section", name, true)?;
        if !self.text.is_empty() {
            self.text.push('\n');
        }
        let _ = writeln!(self.text, "[{name}]");
        Ok(self)
    }

    /// Adds `key = value` to the current section.
    ///
    /// # Errors
    /// A key that is not a plain name, or a value that could break out of its line.
    pub fn set(&mut self, key: &str, value: impl std::fmt::Display) -> Result<&mut Self, IniError> {
        check_name("key", key, false)?;
        let value = value.to_string();
        check_value(key, &value)?;
        let _ = writeln!(self.text, "{key} = {value}");
        Ok(self)
    }

    /// The document's text.
    pub fn finish(self) -> String {
        self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_and_values_are_written_one_a_line() {
        let mut ini = Ini::new();
        ini.section("DEFAULT")
            .and_then(|i| i.set("bind_port", 6200))
            .and_then(|i| i.set("devices", "/srv/node"))
            .expect("valid");
        ini.section("app:object-server")
            .and_then(|i| i.set("use", "egg:swift#object"))
            .expect("valid");
        assert_eq!(
            ini.finish(),
            "[DEFAULT]\nbind_port = 6200\ndevices = /srv/node\n\n[app:object-server]\nuse = egg:swift#object\n"
        );
    }

    #[test]
    fn values_that_could_break_their_line_are_refused() {
        for bad in [
            "/srv/node\n[DEFAULT]",
            "/srv/node\rx",
            "a\u{0}b",
            "%(here)s",
            " lead",
            "trail ",
            "#comment",
            ";comment",
            "[section]",
        ] {
            let mut ini = Ini::new();
            ini.section("DEFAULT").expect("section");
            let e = ini.set("devices", bad).expect_err(bad);
            assert_eq!(e.what, "devices", "{bad:?}");
        }
        let mut ini = Ini::new();
        assert!(ini.section("a]\n[b").is_err());
        assert!(ini.section("").is_err());
        ini.section("DEFAULT").expect("section");
        assert!(ini.set("key = x\ny", "1").is_err());
        assert!(ini.set("a:b", "1").is_err());
    }
}
