use thiserror::Error;

/// Every rejection names the field, the offending value (escaped, so control characters and
/// look-alikes are visible) and the rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PolicyError {
    #[error("invalid {field} {value}: {rule}")]
    InvalidName {
        field: &'static str,
        value: String,
        rule: String,
    },
    #[error("invalid task_description: {rule}")]
    InvalidTask { rule: String },
    #[error("unknown repo {repo}; known targets: {known}")]
    UnknownRepo { repo: String, known: String },
    #[error("unknown orguser {orguser}; known org-users: {known}")]
    UnknownOrgUser { orguser: String, known: String },
    #[error("repo {repo} belongs to orguser {owner}, not {orguser}")]
    OwnerMismatch {
        repo: String,
        owner: String,
        orguser: String,
    },
}

/// Quote and escape a caller-supplied value for an error message, bounded to 80 characters so a
/// hostile value cannot flood a log line.
pub fn escape_value(value: &str) -> String {
    const SHOWN: usize = 80;
    let mut out = String::from("\"");
    for (index, c) in value.chars().enumerate() {
        if index == SHOWN {
            out.push_str(&format!("…\" ({} characters)", value.chars().count()));
            return out;
        }
        if c.is_ascii_graphic() || c == ' ' {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        } else {
            // Non-ASCII is shown as a code point so a Cyrillic 'а' cannot pass for a Latin 'a'.
            out.push_str(&c.escape_unicode().to_string());
        }
    }
    out.push('"');
    out
}
