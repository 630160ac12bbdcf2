use crate::error::{PolicyError, escape_value};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The rule every org-user, repo, unix user and handle follows.
pub const NAME_RULE: &str = "must match ^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$ and not contain \"..\"";

/// Check a name: ASCII letters, digits, `.`, `_`, `-`; a letter or digit first; 1..=128
/// characters; no `..` (so a name can never walk up a path, even if someone later joins it to one).
pub fn validate_name(field: &'static str, value: &str) -> Result<(), PolicyError> {
    let invalid = |why: &str| PolicyError::InvalidName {
        field,
        value: escape_value(value),
        rule: format!("{NAME_RULE} ({why})"),
    };
    let Some(first) = value.chars().next() else {
        return Err(invalid("it is empty"));
    };
    if !first.is_ascii_alphanumeric() {
        return Err(invalid("it must start with an ASCII letter or digit"));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(invalid(&format!(
            "{} is not allowed",
            escape_value(&bad.to_string())
        )));
    }
    if value.len() > 128 {
        return Err(invalid(&format!("it is {} characters long", value.len())));
    }
    if value.contains("..") {
        return Err(invalid("it contains \"..\""));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn parse(value: &str) -> Result<Self, PolicyError> {
                validate_name($field, value)?;
                Ok(Self(value.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = PolicyError;
            fn try_from(value: String) -> Result<Self, PolicyError> {
                validate_name($field, &value)?;
                Ok(Self(value))
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(
    /// An org-user: the owner of a set of repos in the allowlist.
    OrgUser, "orguser"
);
name_type!(
    /// A repo key of the allowlist.
    RepoName, "repo"
);
name_type!(
    /// A local account a lane runs as.
    UnixUserName, "unix_user"
);
name_type!(
    /// A dispatch handle.
    Handle, "handle"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for ok in ["acme", "Acme-2", "a", "repo.name_x", "0x", &"a".repeat(128)] {
            OrgUser::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn rejects_hostile_names_naming_field_value_and_rule() {
        let cases = [
            ("", "empty"),
            ("..", "start with"),
            ("a..b", "\"..\""),
            ("../etc", "start with"),
            ("a/b", "\"/\" is not allowed"),
            (".hidden", "start with"),
            ("-rf", "start with"),
            ("a b", "\" \" is not allowed"),
            ("a\tb", "\"\\u{9}\" is not allowed"),
            ("trailing\n", "\"\\u{a}\" is not allowed"),
            ("аcme", "start with"),                  // Cyrillic а
            ("acmе", "\"\\u{435}\" is not allowed"), // Cyrillic е at the end
            ("ａcme", "start with"),                 // fullwidth a
            ("a\u{200b}b", "\"\\u{200b}\" is not allowed"),
            ("a\0b", "\"\\u{0}\" is not allowed"),
        ];
        for (value, why) in cases {
            let err = RepoName::parse(value).unwrap_err().to_string();
            assert!(err.starts_with("invalid repo "), "{value:?}: {err}");
            assert!(err.contains(NAME_RULE), "{value:?}: {err}");
            assert!(err.contains(why), "{value:?}: {err} (wanted {why})");
        }
        let long = "a".repeat(129);
        let err = OrgUser::parse(&long).unwrap_err().to_string();
        assert!(err.contains("129 characters long"), "{err}");
        assert!(err.contains("invalid orguser"), "{err}");
    }

    #[test]
    fn escaped_value_shows_lookalikes() {
        let err = OrgUser::parse("acmе").unwrap_err().to_string();
        assert!(err.contains("\"acm\\u{435}\""), "{err}");
    }
}
