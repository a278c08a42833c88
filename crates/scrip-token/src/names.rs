//! Names of tools and actions: short, lowercase, and free of the characters
//! that separate grants (`:`) and scope tokens (space), so that a grant string
//! has exactly one reading.

use std::fmt;

/// Why a tool or action name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name was empty.
    #[error("{kind} name is empty")]
    Empty {
        /// `tool` or `action`.
        kind: &'static str,
    },
    /// The name was longer than [`MAX_NAME_LEN`].
    #[error("{kind} name is longer than {MAX_NAME_LEN} characters")]
    TooLong {
        /// `tool` or `action`.
        kind: &'static str,
    },
    /// The name had a character outside `a-z 0-9 . _ -` or did not start
    /// with a letter or digit. The message names that character's position
    /// and kind, neither the name nor the character: text refused here may
    /// be a secret given in the wrong place.
    #[error(
        "{kind} name must start with a lowercase letter or digit and hold only a-z, 0-9, `.`, `_` and `-` (character {at} is {})",
        kind_of(*found)
    )]
    BadChar {
        /// `tool` or `action`.
        kind: &'static str,
        /// Where the first bad character is (1 for the first).
        at: usize,
        /// That character.
        found: char,
    },
}

/// The longest tool or action name accepted.
pub const MAX_NAME_LEN: usize = 64;

fn check(kind: &'static str, s: &str) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty { kind });
    }
    if s.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong { kind });
    }
    let bad = s.chars().enumerate().find(|(i, c)| {
        let allowed = c.is_ascii_lowercase()
            || c.is_ascii_digit()
            || (*i > 0 && matches!(c, '.' | '_' | '-'));
        !allowed
    });
    match bad {
        None => Ok(()),
        Some((i, found)) => Err(NameError::BadChar {
            kind,
            at: i + 1,
            found,
        }),
    }
}

/// What kind of character `c` is, for a message that must not show it.
fn kind_of(c: char) -> &'static str {
    if c.is_ascii_uppercase() {
        "an uppercase letter"
    } else if c == ' ' {
        "a space"
    } else if c.is_ascii_punctuation() {
        "a punctuation mark"
    } else if c.is_control() {
        "a control character"
    } else if crate::is_deceptive(c) {
        "an invisible or direction-changing character"
    } else {
        "a character outside ASCII"
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $ty:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
        #[serde(transparent)]
        pub struct $ty(String);

        impl $ty {
            /// Parses untrusted text into a name.
            ///
            /// # Errors
            /// [`NameError`] when the text is not a valid name.
            pub fn parse(s: &str) -> Result<Self, NameError> {
                check($kind, s)?;
                Ok(Self(s.to_owned()))
            }

            /// The name as text.
            #[must_use]
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($ty), self.0)
            }
        }

        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

name_type!(
    /// The name of a tool registered in the configuration (`github`).
    ToolName,
    "tool"
);
name_type!(
    /// The name of an action at a tool (`read`).
    ActionName,
    "action"
);

#[cfg(test)]
mod tests {
    use super::*;

    fn check_name(input: &str, ok: bool) {
        assert_eq!(ToolName::parse(input).is_ok(), ok, "{input:?}");
    }

    #[test]
    fn names() {
        check_name("github", true);
        check_name("jira-cloud", true);
        check_name("a.b_c-9", true);
        check_name("9lives", true);
        check_name("", false);
        check_name("GitHub", false);
        check_name("git hub", false);
        check_name("git:hub", false);
        check_name("-x", false);
        check_name("é", false);
        check_name(&"a".repeat(65), false);
        check_name(&"a".repeat(64), true);
    }
}
