//! Grants (`tool:action`) and the space-separated scopes that carry them.
//!
//! A task's scope is a [`GrantSet`]; an access token's scope is an
//! [`ActionSet`] at one tool. Both render in a canonical order so that a
//! token's `scope` claim is the same whatever order the client asked in.

use std::collections::BTreeSet;
use std::fmt;

use crate::names::{ActionName, NameError, ToolName};

/// The most items a scope may hold.
pub const MAX_SCOPE_ITEMS: usize = 64;

/// Why a scope was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    /// No scope items at all.
    #[error("scope is empty")]
    Empty,
    /// Two separators in a row, or one at either end.
    #[error("scope has an empty item: separate items with single spaces")]
    EmptyItem,
    /// More than [`MAX_SCOPE_ITEMS`] items.
    #[error("scope has more than {MAX_SCOPE_ITEMS} items")]
    TooMany,
    /// A grant without its `:`. The message does not quote it: text
    /// refused here may be a secret given in the wrong place.
    #[error("every scope item must be of the form `tool:action`; one has no `:`")]
    NotAGrant,
    /// A bad tool or action name.
    #[error(transparent)]
    Name(#[from] NameError),
}

fn items(s: &str) -> Result<impl Iterator<Item = &str>, ScopeError> {
    if s.is_empty() {
        return Err(ScopeError::Empty);
    }
    if s.split(' ').any(str::is_empty) {
        return Err(ScopeError::EmptyItem);
    }
    if s.split(' ').count() > MAX_SCOPE_ITEMS {
        return Err(ScopeError::TooMany);
    }
    Ok(s.split(' '))
}

/// One permission: an action at a tool.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Grant {
    /// The tool.
    pub tool: ToolName,
    /// The action at that tool.
    pub action: ActionName,
}

impl Grant {
    /// Parses `tool:action`.
    ///
    /// # Errors
    /// [`ScopeError`] when the text is not a well-formed grant.
    pub fn parse(s: &str) -> Result<Self, ScopeError> {
        let (tool, action) = s.split_once(':').ok_or(ScopeError::NotAGrant)?;
        Ok(Self {
            tool: ToolName::parse(tool)?,
            action: ActionName::parse(action)?,
        })
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.tool, self.action)
    }
}

/// A set of grants: the scope of a task.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct GrantSet(BTreeSet<Grant>);

impl GrantSet {
    /// Parses a space-separated list of grants.
    ///
    /// # Errors
    /// [`ScopeError`] on an empty scope, an empty item or a bad grant.
    pub fn parse(s: &str) -> Result<Self, ScopeError> {
        items(s)?
            .map(Grant::parse)
            .collect::<Result<BTreeSet<_>, _>>()
            .map(Self)
    }

    /// Whether the set holds `grant`.
    #[must_use]
    pub fn contains(&self, grant: &Grant) -> bool {
        self.0.contains(grant)
    }

    /// Whether every grant of `self` is in `other`.
    #[must_use]
    pub fn is_subset(&self, other: &Self) -> bool {
        self.0.is_subset(&other.0)
    }

    /// Whether the set is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The grants, in canonical order.
    pub fn iter(&self) -> impl Iterator<Item = &Grant> {
        self.0.iter()
    }

    /// The actions this set grants at `tool`.
    #[must_use]
    pub fn actions_at(&self, tool: &ToolName) -> ActionSet {
        ActionSet(
            self.0
                .iter()
                .filter(|g| &g.tool == tool)
                .map(|g| g.action.clone())
                .collect(),
        )
    }
}

impl FromIterator<Grant> for GrantSet {
    fn from_iter<I: IntoIterator<Item = Grant>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

impl fmt::Display for GrantSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        join(f, self.0.iter())
    }
}

/// A set of actions at one tool: the scope of an access token.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct ActionSet(BTreeSet<ActionName>);

impl ActionSet {
    /// Parses a space-separated list of actions.
    ///
    /// # Errors
    /// [`ScopeError`] on an empty scope, an empty item or a bad action name.
    pub fn parse(s: &str) -> Result<Self, ScopeError> {
        items(s)?
            .map(|a| ActionName::parse(a).map_err(ScopeError::from))
            .collect::<Result<BTreeSet<_>, _>>()
            .map(Self)
    }

    /// Whether the set holds `action`.
    #[must_use]
    pub fn contains(&self, action: &ActionName) -> bool {
        self.0.contains(action)
    }

    /// Whether every action of `self` is in `other`.
    #[must_use]
    pub fn is_subset(&self, other: &Self) -> bool {
        self.0.is_subset(&other.0)
    }

    /// Whether the set is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The actions, in canonical order.
    pub fn iter(&self) -> impl Iterator<Item = &ActionName> {
        self.0.iter()
    }
}

impl FromIterator<ActionName> for ActionSet {
    fn from_iter<I: IntoIterator<Item = ActionName>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

impl fmt::Display for ActionSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        join(f, self.0.iter())
    }
}

fn join<T: fmt::Display>(f: &mut fmt::Formatter<'_>, it: impl Iterator<Item = T>) -> fmt::Result {
    for (i, item) in it.enumerate() {
        if i > 0 {
            f.write_str(" ")?;
        }
        write!(f, "{item}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Result<&str, ScopeError>) {
        let got = GrantSet::parse(input).map(|s| s.to_string());
        assert_eq!(got, expected.map(str::to_owned), "{input:?}");
    }

    #[test]
    fn grant_sets() {
        check("github:read", Ok("github:read"));
        check("jira:write github:read", Ok("github:read jira:write"));
        check("github:read github:read", Ok("github:read"));
        check("", Err(ScopeError::Empty));
        check("github:read  jira:write", Err(ScopeError::EmptyItem));
        check(" github:read", Err(ScopeError::EmptyItem));
        check("github", Err(ScopeError::NotAGrant));
        assert!(matches!(
            GrantSet::parse("github:Read"),
            Err(ScopeError::Name(_))
        ));
        assert!(matches!(GrantSet::parse("a:b:c"), Err(ScopeError::Name(_))));
        let many = (0..65)
            .map(|i| format!("t{i}:read"))
            .collect::<Vec<_>>()
            .join(" ");
        check(&many, Err(ScopeError::TooMany));
    }

    #[test]
    fn actions_at_tool() {
        let set = GrantSet::parse("github:read github:write jira:read").unwrap_or_default();
        let github = ToolName::parse("github").ok();
        let actions = github.map(|t| set.actions_at(&t).to_string());
        assert_eq!(actions.as_deref(), Some("read write"));
    }

    #[test]
    fn action_sets() {
        assert_eq!(
            ActionSet::parse("write read").map(|s| s.to_string()),
            Ok("read write".to_owned())
        );
        assert!(ActionSet::parse("read\twrite").is_err());
    }
}
