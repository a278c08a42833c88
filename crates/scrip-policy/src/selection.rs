//! Which policies a decision evaluates: those whose scope can match its
//! action and tool, less those whose condition starts by testing an agent
//! attribute the agent does not have.
//!
//! Invariant: a policy is left out only when Cedar, evaluating it, would
//! find it neither satisfied nor in error, so a decision over the selection
//! is the decision over the whole set (`tests/selection.rs` checks that).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use cedar_policy::{
    ActionConstraint, EntityUid, Policy, PolicyId, PolicySet, ResourceConstraint, Schema,
};
use serde_json::Value;

use crate::PolicyError;

/// The most narrowed sets one selection keeps (it forgets them all when
/// full): one per combination of tested attributes that agents present.
const NARROWED: usize = 256;

/// The policies that can apply to one action, by tool.
///
/// A policy can apply to action `a` when its action scope is unconstrained,
/// is `a`, or is `in` a group that `a` belongs to (per the schema). It can
/// apply to tool `t` when its resource scope is unconstrained, an `is`
/// constraint, or names `Tool::"t"` with `==` or `in` (scrip's tool entities
/// have no parents, so `in Tool::"t"` holds for `t` alone). Anything else
/// scrip cannot rule out is kept, so the selection only ever drops policies
/// that could not have matched.
#[derive(Default)]
pub(crate) struct Selection {
    /// For each tool some policy names: those policies and the ones that
    /// name no tool.
    pub(crate) by_tool: HashMap<String, Selected>,
    /// For every other tool: the policies that name no tool.
    pub(crate) other: Selected,
}

/// The policies for one action and tool, and the same narrowed by what
/// the agent's condition tests find.
///
/// A policy whose condition starts with `principal has a && ...` is
/// false for an agent without attribute `a`: `&&` evaluates left to right
/// and stops at the first false operand, and the scope before it cannot
/// fail, so nothing else in the policy is evaluated and it neither applies
/// nor errors. Such a policy is left out for such an agent. Only the tests
/// that lead the condition count: a `has` after anything else could come
/// after an error.
#[derive(Default)]
pub(crate) struct Selected {
    /// Every policy whose scope can match.
    pub(crate) all: PolicySet,
    /// Each of them with the attribute bits (see [`Guards`]) its condition
    /// tests first; empty when no policy tests any.
    guarded: Vec<(Policy, u64)>,
    /// The union of those bits.
    tested: u64,
    /// By the tested bits an agent has: `all` less the policies it fails.
    narrowed: Mutex<HashMap<u64, Arc<PolicySet>>>,
}

impl Selected {
    fn new(policies: &[&Policy], guards: &Guards) -> Result<Self, PolicyError> {
        let mut all = PolicySet::new();
        let mut guarded = Vec::with_capacity(policies.len());
        let mut tested = 0;
        for policy in policies {
            all.add((*policy).clone())
                .map_err(|_| PolicyError::DuplicateId(policy.id().to_string()))?;
            let needs = guards.needs(policy.id());
            tested |= needs;
            guarded.push(((*policy).clone(), needs));
        }
        if tested == 0 {
            guarded.clear();
        }
        Ok(Self {
            all,
            guarded,
            tested,
            narrowed: Mutex::default(),
        })
    }

    /// The policies to evaluate for an agent with attribute bits `has`:
    /// `None` for all of them.
    pub(crate) fn for_agent(&self, has: u64) -> Result<Option<Arc<PolicySet>>, String> {
        let key = has & self.tested;
        if key == self.tested {
            return Ok(None);
        }
        if let Some(set) = self.narrowed.lock().ok().and_then(|n| n.get(&key).cloned()) {
            return Ok(Some(set));
        }
        let mut set = PolicySet::new();
        for (policy, needs) in &self.guarded {
            if needs & !key == 0 {
                set.add(policy.clone()).map_err(|e| e.to_string())?;
            }
        }
        let set = Arc::new(set);
        if let Ok(mut narrowed) = self.narrowed.lock() {
            if narrowed.len() >= NARROWED {
                narrowed.clear();
            }
            narrowed.insert(key, set.clone());
        }
        Ok(Some(set))
    }
}

/// The agent attributes that policies test first (`principal has a`), one
/// bit each, for the first 64 such names; a test of any other name is not
/// used to leave a policy out.
#[derive(Default)]
pub(crate) struct Guards {
    names: Vec<String>,
    by_policy: HashMap<PolicyId, u64>,
}

impl Guards {
    pub(crate) fn new(set: &PolicySet) -> Self {
        let mut guards = Self::default();
        for policy in set.policies() {
            let mut needs = 0;
            for attr in leading_tests(policy) {
                let bit = match guards.names.iter().position(|n| *n == attr) {
                    Some(i) => i,
                    None if guards.names.len() < 64 => {
                        guards.names.push(attr);
                        guards.names.len() - 1
                    }
                    None => continue,
                };
                needs |= 1 << bit;
            }
            if needs != 0 {
                guards.by_policy.insert(policy.id().clone(), needs);
            }
        }
        guards
    }

    fn needs(&self, id: &PolicyId) -> u64 {
        self.by_policy.get(id).copied().unwrap_or(0)
    }

    /// The bits of the tested attributes for which `has` holds.
    pub(crate) fn bits(&self, has: impl Fn(&str) -> bool) -> u64 {
        self.names
            .iter()
            .enumerate()
            .filter(|(_, n)| has(n))
            .fold(0, |bits, (i, _)| bits | (1 << i))
    }
}

/// The attributes a policy's condition tests with `principal has a` before
/// anything else: the leading operands of its first `when` clause's `&&`
/// chain, continuing into the next clause when every operand of one is
/// such a test. An `unless` clause ends the search.
fn leading_tests(policy: &Policy) -> Vec<String> {
    let Ok(est) = policy.to_json() else {
        return Vec::new();
    };
    let mut tests = Vec::new();
    let conditions = est.get("conditions").and_then(Value::as_array);
    for condition in conditions.into_iter().flatten() {
        if condition.get("kind").and_then(Value::as_str) != Some("when") {
            break;
        }
        let Some(body) = condition.get("body") else {
            break;
        };
        let mut operands = Vec::new();
        conjuncts(body, &mut operands);
        let before = tests.len();
        tests.extend(
            operands
                .iter()
                .map_while(|e| principal_has(e))
                .map(str::to_owned),
        );
        if tests.len() - before < operands.len() {
            break;
        }
    }
    tests
}

/// The operands of an `&&` chain, in evaluation order.
fn conjuncts<'a>(e: &'a Value, out: &mut Vec<&'a Value>) {
    match e.get("&&").map(|and| (and.get("left"), and.get("right"))) {
        Some((Some(left), Some(right))) => {
            conjuncts(left, out);
            conjuncts(right, out);
        }
        _ => out.push(e),
    }
}

/// `a` when `e` is `principal has a` with a single attribute name.
fn principal_has(e: &Value) -> Option<&str> {
    let has = e.get("has")?;
    if has.get("left")?.get("Var")?.as_str()? != "principal" {
        return None;
    }
    has.get("attr")?.as_str()
}

/// Which tools a policy's resource scope can match.
pub(crate) enum ToolScope {
    Any,
    One(String),
}

pub(crate) fn tool_scope(policy: &Policy) -> ToolScope {
    let named = |uid: &EntityUid| {
        (uid.type_name().to_string() == "Tool").then(|| uid.id().unescaped().to_owned())
    };
    // A tool is in no other entity, so `in` a tool, with or without `is
    // Tool`, is that tool alone.
    match policy.resource_constraint() {
        ResourceConstraint::Eq(uid) | ResourceConstraint::In(uid) => {
            named(&uid).map_or(ToolScope::Any, ToolScope::One)
        }
        ResourceConstraint::IsIn(ty, uid) if ty.to_string() == "Tool" => {
            named(&uid).map_or(ToolScope::Any, ToolScope::One)
        }
        ResourceConstraint::Any | ResourceConstraint::Is(_) | ResourceConstraint::IsIn(..) => {
            ToolScope::Any
        }
    }
}

/// Builds the selections: for each action of the schema, the policies whose
/// scope can match it, split by the tool they name.
pub(crate) fn select(
    schema: &Schema,
    set: &PolicySet,
    guards: &Guards,
) -> Result<HashMap<String, Selection>, PolicyError> {
    let groups = schema
        .action_entities()
        .map_err(|e| PolicyError::Validation(format!("  - action hierarchy: {e}")))?;
    let mut selections = HashMap::new();
    for action in schema.actions() {
        // The action itself and every group it is in.
        let mut lineage: HashSet<&EntityUid> = HashSet::from([action]);
        lineage.extend(groups.ancestors(action).into_iter().flatten());
        let applies = |policy: &Policy| match policy.action_constraint() {
            ActionConstraint::Any => true,
            ActionConstraint::Eq(uid) => &uid == action,
            ActionConstraint::In(uids) => uids.iter().any(|uid| lineage.contains(uid)),
        };
        let mut any_tool = Vec::new();
        let mut named: HashMap<String, Vec<&Policy>> = HashMap::new();
        for policy in set.policies().filter(|p| applies(p)) {
            match tool_scope(policy) {
                ToolScope::Any => any_tool.push(policy),
                ToolScope::One(tool) => named.entry(tool).or_default().push(policy),
            }
        }
        let mut selection = Selection {
            by_tool: HashMap::new(),
            other: Selected::new(&any_tool, guards)?,
        };
        for (tool, mut policies) in named {
            policies.extend(any_tool.iter().copied());
            selection
                .by_tool
                .insert(tool, Selected::new(&policies, guards)?);
        }
        selections.insert(action.id().unescaped().to_owned(), selection);
    }
    Ok(selections)
}

#[cfg(test)]
mod tests {
    use std::str::FromStr as _;

    use cedar_policy::Policy;

    use super::leading_tests;

    fn tests_of(text: &str) -> Vec<String> {
        leading_tests(&Policy::from_str(text).expect("a policy"))
    }

    #[test]
    fn only_the_tests_that_lead_the_condition_count() {
        let permit = "permit (principal, action, resource)";
        let cases: [(&str, &[&str]); 9] = [
            ("when { principal has namespace }", &["namespace"]),
            (
                "when { principal has namespace && principal.namespace == \"a\" }",
                &["namespace"],
            ),
            (
                "when { principal has namespace && principal has pod && principal.pod == \"p\" }",
                &["namespace", "pod"],
            ),
            // After something else, a test could come after an error.
            (
                "when { principal.subject == \"s\" && principal has namespace }",
                &[],
            ),
            // An `unless` is true when the attribute is missing.
            ("unless { principal has namespace }", &[]),
            (
                "unless { principal has pod } when { principal has namespace }",
                &[],
            ),
            // On into the next clause only when one held nothing else.
            (
                "when { principal has repository } when { principal has ref && principal.ref == \"r\" }",
                &["repository", "ref"],
            ),
            (
                "when { principal has repository && principal.repository == \"x\" } when { principal has ref }",
                &["repository"],
            ),
            // Not the principal, or not a plain conjunction.
            ("when { resource has name || principal has namespace }", &[]),
        ];
        for (condition, want) in cases {
            assert_eq!(
                tests_of(&format!("{permit} {condition};")),
                want,
                "{condition}"
            );
        }
    }
}
