//! A request's context is checked against the schema once for each action
//! and shape of context (which optional attributes it has, whether its set
//! is empty); the check's answer must not depend on whether it ran before.
//! Each case decides the same request repeatedly, and alternates shapes, on
//! a schema that accepts some shapes and refuses others: a refused shape is
//! denied every time, however many accepted requests came before it, and an
//! accepted one is allowed every time, however many refused ones did.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code"
)]

use std::collections::BTreeMap;

use scrip_config::Tool;
use scrip_policy::{
    DEFAULT_SCHEMA, Decision, DecisionRequest, PolicyEngine, RequestContext, Stage,
};
use scrip_token::{ActionName, ToolName, WorkloadIdentity};

const ALLOW_ALL: &str = r#"
@id("anything")
permit (principal, action, resource);
"#;

fn engine(schema: &str) -> PolicyEngine {
    PolicyEngine::from_sources(
        Some(("test.cedarschema", schema)),
        &[("p.cedar".into(), ALLOW_ALL.into())],
    )
    .unwrap()
}

/// The default schema with one line of it replaced.
fn schema_with(line: &str, replacement: &str) -> String {
    assert!(DEFAULT_SCHEMA.contains(line), "{line}");
    DEFAULT_SCHEMA.replacen(line, replacement, 1)
}

fn agent() -> WorkloadIdentity {
    let mut claims = serde_json::Map::new();
    claims.insert("sub".into(), "system:serviceaccount:ci:agent".into());
    WorkloadIdentity::from_claims("https://k8s.example", &claims).unwrap()
}

fn tool() -> Tool {
    Tool {
        name: ToolName::parse("github").unwrap(),
        resource: "https://api.github.com".into(),
        actions: vec![ActionName::parse("read").unwrap()],
        labels: BTreeMap::new(),
        introspectors: Vec::new(),
    }
}

/// A context of each shape the cases use.
#[derive(Debug, Clone, Copy)]
enum Shape {
    Plain,
    Ticket,
    /// A delegated task's request: its actor's subject and issuer.
    Chain,
    /// A delegated task's whose actor was recorded without its issuer
    /// (before scrip kept it): a chain, no issuers.
    ChainOfOld,
    Proxy,
    /// A DPoP-bound token's request.
    Bound,
}

/// The issuer of [`Shape::Chain`]'s actor.
const ACTOR_ISSUER: &str = "https://token.actions.githubusercontent.com";

fn context(shape: Shape) -> RequestContext {
    RequestContext {
        stage: if matches!(shape, Shape::Proxy) {
            Stage::Proxy
        } else {
            Stage::Token
        },
        purpose: if matches!(shape, Shape::Ticket) {
            "fix JIRA-7".into()
        } else {
            "refactor".into()
        },
        environment: "dev".into(),
        delegation_depth: u32::from(matches!(shape, Shape::Chain | Shape::ChainOfOld)),
        delegation_chain: if matches!(shape, Shape::Chain | Shape::ChainOfOld) {
            vec!["sub-agent".into()]
        } else {
            Vec::new()
        },
        delegation_issuers: if matches!(shape, Shape::Chain) {
            vec![ACTOR_ISSUER.into()]
        } else {
            Vec::new()
        },
        now: 1_800_000_000,
        approved: false,
        method: matches!(shape, Shape::Proxy).then(|| "GET".into()),
        path: matches!(shape, Shape::Proxy).then(|| "/repos".into()),
        dpop_jkt: matches!(shape, Shape::Bound)
            .then(|| "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs".into()),
    }
}

/// Decides `shapes` in order, each with and without the selection, and
/// returns whether each was allowed; a denial must be the schema's (the
/// policies allow everything).
fn decide(engine: &PolicyEngine, action: &str, shapes: &[Shape]) -> Vec<bool> {
    decisions(engine, action, shapes)
        .into_iter()
        .zip(shapes)
        .map(|(d, shape)| {
            if !d.allowed {
                assert!(
                    d.reason
                        .starts_with("policy request could not be evaluated"),
                    "{shape:?}: {}",
                    d.reason
                );
            }
            d.allowed
        })
        .collect()
}

/// The decisions on `shapes`, in order, each with and without the
/// selection (which must agree).
fn decisions(engine: &PolicyEngine, action: &str, shapes: &[Shape]) -> Vec<Decision> {
    let (agent, tool) = (agent(), tool());
    let action = ActionName::parse(action).unwrap();
    shapes
        .iter()
        .map(|shape| {
            let context = context(*shape);
            let req = DecisionRequest {
                agent: &agent,
                action: &action,
                tool: &tool,
                context: &context,
            };
            let d = engine.decide(&req);
            assert_eq!(d, engine.decide_evaluating_all(&req), "{shape:?}");
            d
        })
        .collect()
}

fn check(schema: &str, action: &str, shapes: &[Shape], expected: &[bool]) {
    // A new engine per order, so that each order starts with nothing checked.
    let forward = decide(&engine(schema), action, shapes);
    assert_eq!(forward, expected, "{shapes:?}");
    let reversed: Vec<Shape> = shapes.iter().rev().copied().collect();
    let expected_reversed: Vec<bool> = expected.iter().rev().copied().collect();
    assert_eq!(
        decide(&engine(schema), action, &reversed),
        expected_reversed,
        "{reversed:?}"
    );
}

#[test]
fn every_shape_passes_the_default_schema() {
    use Shape::{Bound, Chain, ChainOfOld, Plain, Proxy, Ticket};
    check(
        DEFAULT_SCHEMA,
        "read",
        &[
            Plain, Ticket, Chain, ChainOfOld, Proxy, Bound, Plain, Ticket, Chain, ChainOfOld,
            Proxy, Bound,
        ],
        &[true; 12],
    );
}

const ISSUERS_LINE: &str =
    "  delegation_issuers: Set<String>, // issuers of the actors' identities\n";

/// `context.delegation_issuers` is given only to an action whose context
/// declares it: one written before it existed decides a delegated task's
/// requests as it did, and one that declares it gets it, checked against
/// its type once it has elements (an actor recorded without its issuer
/// gives an empty set, a shape of its own).
#[test]
fn delegation_issuers_is_given_only_where_the_schema_declares_it() {
    use Shape::{Chain, ChainOfOld, Plain};
    check(
        &schema_with(ISSUERS_LINE, ""),
        "read",
        &[Plain, Chain, ChainOfOld, Chain, Plain],
        &[true; 5],
    );
    check(
        &schema_with(ISSUERS_LINE, "  delegation_issuers: Set<Long>,\n"),
        "read",
        &[Plain, ChainOfOld, Chain, ChainOfOld, Chain, Plain],
        &[true, true, false, true, false, true],
    );
    let schema = format!(
        "{DEFAULT_SCHEMA}\ntype Old = {{ stage: String, purpose: String, ticket?: String, environment: String, delegation_depth: Long, delegation_chain: Set<String>, now: Long, approved: Bool, method?: String, path?: String, dpop_jkt?: String }};\naction scan appliesTo {{ principal: [Agent], resource: [Tool], context: Old }};\n"
    );
    check(
        &schema,
        "scan",
        &[Plain, Chain, ChainOfOld, Chain],
        &[true; 4],
    );
    check(
        &schema,
        "read",
        &[Plain, Chain, ChainOfOld, Chain],
        &[true; 4],
    );
}

/// A policy can refuse every sub-agent whose identity comes from one
/// issuer, whoever the task's agent (the principal) is: what an operator
/// does when that issuer is compromised.
#[test]
fn a_policy_can_refuse_the_sub_agents_of_an_issuer() {
    use Shape::{Chain, ChainOfOld, Plain, Proxy};
    let policies = format!(
        r#"
@id("anything")
permit (principal, action, resource);
@id("issuer-compromised")
forbid (principal, action, resource)
  when {{ context.delegation_issuers.contains("{ACTOR_ISSUER}") }};
"#
    );
    let engine = PolicyEngine::from_sources(None, &[("p.cedar".into(), policies)]).unwrap();
    assert_eq!(
        decide_plainly(&engine, &[Plain, Chain, ChainOfOld, Proxy, Chain]),
        [true, false, true, true, false]
    );
    let d = &decisions(&engine, "read", &[Chain])[0];
    assert_eq!(d.policies, ["issuer-compromised"], "{d:?}");
}

const DPOP_LINE: &str = "  dpop_jkt?: String,          // the DPoP key (RFC 7638 thumbprint) of a bound token: the one issued (stages \"task\", \"token\") or presented (stage \"proxy\"); absent for a bearer token\n";

/// `context.dpop_jkt` is given only to a schema that declares it: one
/// written before it existed decides a bound token's requests as it did
/// (rather than deny them all as carrying an attribute it lacks), and one
/// that declares it gets it, checked against its type like the others.
#[test]
fn dpop_jkt_is_given_only_to_a_schema_that_declares_it() {
    use Shape::{Bound, Plain};
    check(
        &schema_with(DPOP_LINE, ""),
        "read",
        &[Plain, Bound, Bound, Plain],
        &[true; 4],
    );
    check(
        &schema_with(DPOP_LINE, "  dpop_jkt?: Long,\n"),
        "read",
        &[Plain, Bound, Bound, Plain, Bound],
        &[true, false, false, true, false],
    );
}

/// Each action by its own context: one whose context type (written before
/// `dpop_jkt` existed) lacks it decides bound requests as it did, beside
/// actions whose context declares it.
#[test]
fn dpop_jkt_is_given_to_each_action_whose_context_declares_it() {
    use Shape::{Bound, Plain};
    let schema = format!(
        "{DEFAULT_SCHEMA}\ntype Old = {{ stage: String, purpose: String, ticket?: String, environment: String, delegation_depth: Long, delegation_chain: Set<String>, now: Long, approved: Bool, method?: String, path?: String }};\naction scan appliesTo {{ principal: [Agent], resource: [Tool], context: Old }};\n"
    );
    check(&schema, "scan", &[Plain, Bound, Bound, Plain], &[true; 4]);
    check(&schema, "read", &[Plain, Bound, Bound, Plain], &[true; 4]);
}

/// A policy can require a bound token: `context has dpop_jkt` holds for a
/// bound token's request only.
#[test]
fn a_policy_can_require_a_bound_token() {
    use Shape::{Bound, Plain, Proxy};
    let policies = r#"
@id("anything")
permit (principal, action, resource);
@id("bound-only")
forbid (principal, action, resource) unless { context has dpop_jkt };
"#;
    let engine = PolicyEngine::from_sources(None, &[("p.cedar".into(), policies.into())]).unwrap();
    assert_eq!(
        decide_plainly(&engine, &[Plain, Bound, Proxy, Bound]),
        [false, true, false, true]
    );
    // With a schema that does not declare it, the attribute is never
    // there: such a rule denies bound tokens too (it fails closed).
    let schema = schema_with(DPOP_LINE, "");
    let old = PolicyEngine::from_sources(
        Some(("old.cedarschema", &schema)),
        &[("p.cedar".into(), policies.into())],
    )
    .unwrap();
    assert_eq!(decide_plainly(&old, &[Plain, Bound]), [false, false]);
}

/// Whether each shape is allowed, for an engine whose denials may come
/// from a policy.
fn decide_plainly(engine: &PolicyEngine, shapes: &[Shape]) -> Vec<bool> {
    decisions(engine, "read", shapes)
        .iter()
        .map(|d| d.allowed)
        .collect()
}

#[test]
fn a_context_attribute_the_schema_lacks_denies_only_its_shape() {
    use Shape::{Plain, Ticket};
    let schema = schema_with(
        "  ticket?: String,            // the first ticket id in the purpose (JIRA-123)\n",
        "",
    );
    check(
        &schema,
        "read",
        &[Plain, Plain, Ticket, Ticket, Plain, Ticket],
        &[true, true, false, false, true, false],
    );
}

#[test]
fn a_set_is_checked_by_its_element_type_once_it_has_elements() {
    use Shape::{Chain, Plain};
    let schema = schema_with(
        "  delegation_chain: Set<String>, // subjects of the actors\n",
        "  delegation_chain: Set<Long>,\n",
    );
    check(
        &schema,
        "read",
        &[Plain, Plain, Chain, Chain, Plain],
        &[true, true, false, false, true],
    );
}

#[test]
fn an_attribute_of_another_type_denies_every_shape() {
    use Shape::{Chain, Plain, Proxy, Ticket};
    let schema = schema_with(
        "  purpose: String,            // the task's purpose\n",
        "  purpose: Long,\n",
    );
    check(
        &schema,
        "read",
        &[Plain, Plain, Ticket, Chain, Proxy],
        &[false; 5],
    );
}

#[test]
fn an_action_that_does_not_apply_to_agents_and_tools_is_denied_every_time() {
    use Shape::{Plain, Ticket};
    let schema = format!(
        "{DEFAULT_SCHEMA}\nentity Robot;\naction scan appliesTo {{ principal: [Robot], resource: [Tool], context: Request }};\n"
    );
    check(&schema, "scan", &[Plain, Plain, Ticket, Plain], &[false; 4]);
    // The same engine still allows the actions that do apply.
    let engine = engine(&schema);
    assert_eq!(decide(&engine, "scan", &[Plain]), [false]);
    assert_eq!(decide(&engine, "read", &[Plain, Ticket]), [true, true]);
    assert_eq!(decide(&engine, "scan", &[Plain]), [false]);
}

#[test]
fn an_enumerated_tool_type_is_denied_every_time() {
    use Shape::{Plain, Ticket};
    // The request's scope check would depend on the ids of an enumerated
    // type; such entities cannot be built, whatever the id.
    for schema in [
        schema_with(
            "entity Tool {\n  name: String,\n  resource: String,\n} tags String;",
            "entity Tool enum [\"github\"];",
        ),
        schema_with(
            "entity Tool {\n  name: String,\n  resource: String,\n} tags String;",
            "entity Tool enum [\"jira\"];",
        ),
    ] {
        check(&schema, "read", &[Plain, Plain, Ticket], &[false; 3]);
    }
}

#[test]
fn an_action_id_in_two_namespaces_is_refused() {
    let base = schema_with(
        "action read, write, delete, execute appliesTo",
        "action read, write, execute appliesTo",
    );
    let schema = format!(
        "{base}\nnamespace Ops {{\n  action delete appliesTo {{ principal: [Agent], resource: [Tool], context: Request }};\n}}\nnamespace Dev {{\n  action delete appliesTo {{ principal: [Agent], resource: [Tool], context: Request }};\n}}\n"
    );
    let Err(err) = PolicyEngine::from_sources(
        Some(("test.cedarschema", &schema)),
        &[("p.cedar".into(), ALLOW_ALL.into())],
    ) else {
        panic!("a schema with one action id in two namespaces was accepted")
    };
    assert!(
        err.to_string()
            .contains("action `delete` is declared in more than one namespace"),
        "{err}"
    );
}

#[test]
fn a_schema_giving_agents_or_tools_parents_is_refused() {
    // scrip builds agents and tools without parents, so `principal in
    // Team::"..."` would never hold and this `forbid` would never apply,
    // though the schema makes it valid.
    let forbid = format!(
        "{ALLOW_ALL}\nforbid (principal in Team::\"contractors\", action, resource in Project::\"prod\");\n"
    );
    for (line, replacement, parent) in [
        ("entity Agent {", "entity Agent in [Team] {", "Team"),
        ("entity Tool {", "entity Tool in [Project] {", "Project"),
    ] {
        let schema = format!(
            "entity Team;\nentity Project;\n{}",
            schema_with(line, replacement)
        );
        let Err(err) = PolicyEngine::from_sources(
            Some(("test.cedarschema", &schema)),
            &[("p.cedar".into(), forbid.clone())],
        ) else {
            panic!("a schema giving {parent} children was accepted")
        };
        assert!(
            err.to_string()
                .contains(&format!("is declared `in [{parent}]`")),
            "{err}"
        );
    }
    // Without parents, the same `forbid` can never apply either: the
    // validator says so, and the set is refused rather than loaded with a
    // rule that denies nothing.
    for (schema, policy) in [
        (
            format!("entity Team;\n{DEFAULT_SCHEMA}"),
            "forbid (principal in Team::\"contractors\", action, resource);",
        ),
        (
            DEFAULT_SCHEMA.to_owned(),
            "forbid (principal, action, resource in Agent::\"x\");",
        ),
    ] {
        let Err(err) = PolicyEngine::from_sources(
            Some(("test.cedarschema", &schema)),
            &[("p.cedar".into(), format!("{ALLOW_ALL}\n{policy}\n"))],
        ) else {
            panic!("a forbid that can never apply was loaded: {policy}")
        };
        assert!(err.to_string().contains("can never apply"), "{err}");
    }
    // A permit that can never apply only never allows: loaded.
    PolicyEngine::from_sources(
        Some(("test.cedarschema", DEFAULT_SCHEMA)),
        &[(
            "p.cedar".into(),
            "permit (principal, action, resource in Agent::\"x\");".into(),
        )],
    )
    .unwrap();
}

#[test]
fn a_schema_declaring_attributes_scrip_never_fills_is_refused() {
    // scrip fills only the built-in schema's attributes; a claim is a tag.
    // An attribute it never fills would validate `principal has email`,
    // which then never holds: this `forbid` would never apply.
    let forbid = format!(
        "{ALLOW_ALL}\nforbid (principal, action, resource) when {{ principal has email && principal.email like \"*@contractor.example\" }};\n"
    );
    let inline_context = DEFAULT_SCHEMA.replace("context: Request,", "context: Request2,")
        + "\ntype Request2 = { stage: String, purpose: String, environment: String, delegation_depth: Long, delegation_chain: Set<String>, now: Long, approved: Bool, vpn?: Bool };\n";
    for (schema, place, name) in [
        (
            schema_with(
                "  subject: String,",
                "  subject: String,\n  email?: String,",
            ),
            "entity Agent",
            "email",
        ),
        (
            schema_with(
                "  resource: String,\n}",
                "  resource: String,\n  owner?: String,\n}",
            ),
            "entity Tool",
            "owner",
        ),
        (
            schema_with(
                "  approved: Bool, ",
                "  approved: Bool,\n  risk?: Long,\n  ",
            ),
            "the context of actions",
            "risk",
        ),
        (inline_context, "the context of actions", "vpn"),
        (
            DEFAULT_SCHEMA.replace("context: Request,", "context: Alias,")
                + "\ntype Alias = Base;\ntype Base = { stage: String, purpose: String, environment: String, delegation_depth: Long, delegation_chain: Set<String>, now: Long, approved: Bool, shift?: String };\n",
            "the context of actions",
            "shift",
        ),
        (
            format!(
                "{DEFAULT_SCHEMA}\nnamespace Ops {{ type Ctx = {{ shift?: String }}; action page appliesTo {{ principal: [Agent], resource: [Tool], context: Ctx }}; }}\n"
            ),
            "the context of actions",
            "shift",
        ),
    ] {
        let policy = if name == "email" {
            forbid.clone()
        } else {
            ALLOW_ALL.to_owned()
        };
        let Err(err) = PolicyEngine::from_sources(
            Some(("test.cedarschema", &schema)),
            &[("p.cedar".into(), policy)],
        ) else {
            panic!("a schema declaring `{name}` was accepted")
        };
        assert!(
            err.to_string()
                .contains(&format!("{place} declares attribute `{name}`")),
            "{err}"
        );
    }
    // Declaring fewer than scrip fills is still accepted (requests whose
    // entities carry an undeclared attribute are denied), and so are other
    // entity types' attributes and the built-in schema itself.
    for schema in [
        schema_with("  pod?: String,              // Kubernetes\n", ""),
        format!("entity Team {{ size?: Long }};\n{DEFAULT_SCHEMA}"),
        DEFAULT_SCHEMA.to_owned(),
    ] {
        PolicyEngine::from_sources(
            Some(("test.cedarschema", &schema)),
            &[("p.cedar".into(), ALLOW_ALL.into())],
        )
        .unwrap();
    }
}
