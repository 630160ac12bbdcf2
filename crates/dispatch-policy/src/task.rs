use crate::error::PolicyError;
use std::fmt;

/// Longest task, in characters after trimming (as the Python server counted).
pub const MAX_TASK_CHARS: usize = 8000;

/// A task description: data handed to the lane as exactly one argv element. Shell
/// metacharacters, leading dashes and quotes are all allowed: nothing ever interprets them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task(String);

impl Task {
    pub fn parse(value: &str) -> Result<Self, PolicyError> {
        if value.contains('\0') {
            let at = value.chars().take_while(|&c| c != '\0').count();
            return Err(PolicyError::InvalidTask {
                rule: format!(
                    "contains a NUL byte at character {at}; a NUL cannot be passed as an argument"
                ),
            });
        }
        let trimmed = value.trim();
        if trimmed.is_empty() {
            return Err(PolicyError::InvalidTask {
                rule: "is empty (or only whitespace); describe the unit of work".into(),
            });
        }
        let chars = trimmed.chars().count();
        if chars > MAX_TASK_CHARS {
            return Err(PolicyError::InvalidTask {
                rule: format!(
                    "is {chars} characters long after trimming; the limit is {MAX_TASK_CHARS}"
                ),
            });
        }
        Ok(Task(trimmed.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the task looks like a command-line option. It is always passed as one argv
    /// element, but a program that parses options (getopt, argparse, clap) could still read
    /// `--help`, `-x` or `--host=x` at that position as an option rather than as data. A dash
    /// followed by a space (a Markdown list item, `- fix the flaky test`) or a lone dash is not
    /// an option to any of them.
    pub fn is_option_like(&self) -> bool {
        let mut chars = self.0.chars();
        chars.next() == Some('-') && chars.next().is_some_and(|second| !second.is_whitespace())
    }

    /// The rejection for an option-like task, naming the rule.
    pub fn option_like_error(&self) -> PolicyError {
        PolicyError::InvalidTask {
            rule: format!(
                "starts with '-' ({}), which the dispatch command could read as an option; \
                 rephrase it to start with a word",
                crate::error::escape_value(&self.0.chars().take(20).collect::<String>())
            ),
        }
    }

    /// A short single-line preview for audit records and lists.
    pub fn preview(&self) -> String {
        const PREVIEW: usize = 120;
        let mut preview: String = self
            .0
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(PREVIEW)
            .collect();
        if self.0.chars().count() > PREVIEW {
            preview.push('…');
        }
        preview
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_empty_and_whitespace_only() {
        for value in ["", "   ", "\n\t "] {
            let err = Task::parse(value).unwrap_err().to_string();
            assert!(
                err.contains("task_description") && err.contains("empty"),
                "{err}"
            );
        }
    }

    #[test]
    fn length_limit_is_8000_characters_after_trimming() {
        assert!(Task::parse(&"x".repeat(8000)).is_ok());
        assert!(Task::parse(&format!("  {}  ", "é".repeat(8000))).is_ok());
        let err = Task::parse(&"x".repeat(8001)).unwrap_err().to_string();
        assert!(
            err.contains("8001 characters") && err.contains("8000"),
            "{err}"
        );
    }

    #[test]
    fn nul_is_rejected_with_its_position() {
        let err = Task::parse("run\0build").unwrap_err().to_string();
        assert!(err.contains("NUL byte at character 3"), "{err}");
    }

    #[test]
    fn shell_metacharacters_are_data() {
        for value in [
            "$(rm -rf /)",
            "`id`; echo pwned | sh && x || y > /etc/passwd",
            "--help",
            "-c 'id'",
            "a\nb",
        ] {
            assert_eq!(Task::parse(value).unwrap().as_str(), value.trim());
        }
    }

    #[test]
    fn option_like_tasks_are_recognised() {
        for option in ["--help", "-c 'id'", "  -x"] {
            let task = Task::parse(option).unwrap();
            assert!(task.is_option_like(), "{option}");
            let err = task.option_like_error().to_string();
            assert!(
                err.contains("starts with '-'") && err.contains("option"),
                "{err}"
            );
        }
        assert!(!Task::parse("build it --fast").unwrap().is_option_like());
        // What no option parser reads as an option: a Markdown list item, a lone dash.
        for data in ["- fix the flaky test", "-\tindented", "-"] {
            assert!(!Task::parse(data).unwrap().is_option_like(), "{data:?}");
        }
    }

    #[test]
    fn preview_is_one_line_and_bounded() {
        let task = Task::parse(&format!("line1\nline2 {}", "y".repeat(500))).unwrap();
        let preview = task.preview();
        assert!(!preview.contains('\n'));
        assert_eq!(preview.chars().count(), 121);
    }
}
