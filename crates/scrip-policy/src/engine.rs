//! The engine: a validated policy set and the decision function.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cedar_policy::{
    Authorizer, Context, Decision as CedarDecision, Entities, Entity, EntityUid, PolicyId,
    PolicySet, Request, RestrictedExpression, Schema, ValidationMode, Validator,
};
use scrip_config::Tool;
use scrip_token::{ActionName, WorkloadIdentity};

use crate::selection::{Guards, Selected, Selection, ToolScope, select, tool_scope};
use crate::{DEFAULT_SCHEMA, PolicyError};

/// Which exchange a decision is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Starting (or delegating) a task: one request per asked grant.
    Task,
    /// An access token for one tool: one request per asked action.
    Token,
    /// One request through the proxy: the mapped action, with the method
    /// and path in the context.
    Proxy,
}

impl Stage {
    fn as_str(self) -> &'static str {
        match self {
            Self::Task => "task",
            Self::Token => "token",
            Self::Proxy => "proxy",
        }
    }
}

/// The context of a request: the task and the moment.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// Which exchange.
    pub stage: Stage,
    /// The task's purpose.
    pub purpose: String,
    /// The task's environment.
    pub environment: String,
    /// Delegation depth (0: the agent's own task).
    pub delegation_depth: u32,
    /// Subjects of the actors, current first.
    pub delegation_chain: Vec<String>,
    /// Issuers of the actors' identities, current first
    /// (`context.delegation_issuers`): what a policy names to refuse every
    /// sub-agent of one issuer, the principal being the task's root agent.
    /// Given to policies only when the schema declares it.
    pub delegation_issuers: Vec<String>,
    /// Seconds since the epoch.
    pub now: u64,
    /// Whether a person approved this step.
    pub approved: bool,
    /// A proxied request's HTTP method (`context.method`).
    pub method: Option<String>,
    /// A proxied request's path below the upstream, without the query
    /// (`context.path`).
    pub path: Option<String>,
    /// The RFC 7638 thumbprint of the DPoP key the token being issued is
    /// bound to (a task token, a sub-task's, an access token), or at the
    /// proxy the presented token's (`context.dpop_jkt`); `None` for a
    /// bearer token. Given to policies only when the schema declares it.
    pub dpop_jkt: Option<String>,
}

/// One authorization question.
#[derive(Debug, Clone, Copy)]
pub struct DecisionRequest<'a> {
    /// The agent.
    pub agent: &'a WorkloadIdentity,
    /// The action.
    pub action: &'a ActionName,
    /// The tool.
    pub tool: &'a Tool,
    /// The context.
    pub context: &'a RequestContext,
}

/// The answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request is allowed.
    pub allowed: bool,
    /// The ids of the policies that decided (the permits that allowed it, or
    /// the forbids that denied it; empty when nothing applied).
    pub policies: Vec<String>,
    /// A short reason for the audit trail and the client.
    pub reason: String,
}

impl Decision {
    fn deny(reason: impl Into<String>) -> Self {
        Self {
            allowed: false,
            policies: Vec::new(),
            reason: reason.into(),
        }
    }
}

/// A validated policy set with its schema.
///
/// A decision evaluates only the policies whose scope can match its action
/// and tool, less those whose condition starts by testing an attribute the
/// agent lacks (see [`Selection`] and [`Selected`]); the result is the same
/// as evaluating the whole set, because Cedar never evaluates the condition
/// of a policy whose scope does not match, and such a condition is false
/// before anything in it could fail.
pub struct PolicyEngine {
    schema: Schema,
    policies: PolicySet,
    selections: HashMap<String, Selection>,
    guards: Guards,
    authorizer: Authorizer,
    /// The schema's actions, by name.
    actions: HashMap<String, SchemaAction>,
    count: usize,
    entities: EntityCache,
    /// [`PolicyEngine::digest`].
    digest: String,
}

/// An action of the schema, and the context shapes already checked
/// against the schema for it.
struct SchemaAction {
    uid: EntityUid,
    /// Bit [`ContextShape::bit`] is set once a request of this action with
    /// a context of that shape passed the schema check.
    checked: AtomicU64,
    /// Whether the action's context declares `dpop_jkt`: a custom schema
    /// written before it existed goes on deciding as it did, rather than
    /// denying every request of a bound token as carrying an attribute it
    /// does not declare.
    fills_dpop: bool,
    /// Whether the action's context declares `delegation_issuers`, as
    /// `fills_dpop` for `dpop_jkt`.
    fills_issuers: bool,
}

/// What the schema check of a request's context depends on: which optional
/// attributes it has, and whether each of its sets is empty (an empty set
/// conforms to a set of any element type; a set of strings only to
/// `Set<String>`); whether it has `delegation_issuers` at all is the
/// action's ([`SchemaAction::fills_issuers`]). Every other attribute is always present with the same
/// Cedar type, and string, long and boolean values conform by type alone.
/// The principal and resource are always an `Agent` and a `Tool`; their ids
/// would matter only if the schema enumerated them, and an enumerated type
/// cannot hold the attributes scrip gives both, so their entities fail
/// before any request is built. So two requests of one action whose
/// contexts have the same shape pass or fail the check alike, and the
/// engine checks each shape once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ContextShape {
    ticket: bool,
    method: bool,
    path: bool,
    chain: bool,
    dpop: bool,
    issuers: bool,
}

impl ContextShape {
    fn of(c: &RequestContext, ticket: bool, dpop: bool, issuers: Option<&[String]>) -> Self {
        Self {
            ticket,
            method: c.method.is_some(),
            path: c.path.is_some(),
            chain: !c.delegation_chain.is_empty(),
            dpop,
            issuers: issuers.is_some_and(|i| !i.is_empty()),
        }
    }

    /// One bit of 64 (`SchemaAction::checked`).
    fn bit(self) -> u64 {
        1 << (u32::from(self.ticket)
            | u32::from(self.method) << 1
            | u32::from(self.path) << 2
            | u32::from(self.chain) << 3
            | u32::from(self.dpop) << 4
            | u32::from(self.issuers) << 5)
    }
}

/// The most agent-and-tool entity sets each of an engine's two generations
/// keeps (an engine is replaced, and its cache with it, on reload).
const ENTITY_CACHE: usize = 4096;

/// A decision's principal and resource with their schema-checked entities.
/// Building and checking them against the schema is most of a decision's
/// cost, and they are the same for every request of one agent at one tool,
/// so the engine keeps them, keyed by the whole identity and the whole tool
/// entity (never by a hash that two agents could share).
struct Prepared {
    principal: EntityUid,
    resource: EntityUid,
    entities: Entities,
    /// The agent's attributes among those policies test first
    /// ([`Guards::bits`]).
    has: u64,
}

/// The tool entity's inputs: a cached entry is used only for the same ones.
#[derive(PartialEq, Eq)]
struct ToolKey {
    resource: String,
    labels: BTreeMap<String, String>,
}

/// One tool's kept entities, by agent identity.
type ByAgent = HashMap<WorkloadIdentity, Arc<Prepared>>;

/// A generation of kept entities: by tool name, the tool entity's inputs
/// and its agents'; and how many it holds.
#[derive(Default)]
struct Generation {
    by_tool: HashMap<String, (ToolKey, ByAgent)>,
    len: usize,
}

impl Generation {
    fn get(&self, agent: &WorkloadIdentity, tool: &Tool) -> Option<Arc<Prepared>> {
        let (key, agents) = self.by_tool.get(tool.name.as_str())?;
        if key.resource != tool.resource || key.labels != tool.labels {
            return None;
        }
        agents.get(agent).cloned()
    }

    fn take(&mut self, agent: &WorkloadIdentity, tool: &Tool) -> Option<Arc<Prepared>> {
        let (key, agents) = self.by_tool.get_mut(tool.name.as_str())?;
        if key.resource != tool.resource || key.labels != tool.labels {
            return None;
        }
        let taken = agents.remove(agent)?;
        self.len = self.len.saturating_sub(1);
        Some(taken)
    }

    fn insert(&mut self, agent: &WorkloadIdentity, tool: &Tool, prepared: Arc<Prepared>) {
        let key = ToolKey {
            resource: tool.resource.clone(),
            labels: tool.labels.clone(),
        };
        match self.by_tool.get_mut(tool.name.as_str()) {
            Some((k, agents)) if *k == key => {
                if agents.insert(agent.clone(), prepared).is_none() {
                    self.len += 1;
                }
            }
            _ => {
                // A tool entity changed under the same name: its agents'
                // entities are of the old one.
                if let Some((_, gone)) = self.by_tool.insert(
                    tool.name.to_string(),
                    (key, HashMap::from([(agent.clone(), prepared)])),
                ) {
                    self.len = self.len.saturating_sub(gone.len());
                }
                self.len += 1;
            }
        }
    }
}

/// The kept entities: new ones go in `new`; once it holds
/// [`ENTITY_CACHE`] it becomes `old`, and the `old` before it is dropped.
/// One found in `old` moves to `new`. So the agents in use stay kept
/// however many others pass (none is built again while no more than
/// [`ENTITY_CACHE`] are in use, as when one map of that many was emptied
/// once full), the cache never holds more than twice that, and no moment
/// forgets every entry at once.
#[derive(Default)]
struct EntityCache {
    generations: Mutex<(Generation, Generation)>,
}

impl EntityCache {
    fn get(&self, agent: &WorkloadIdentity, tool: &Tool) -> Option<Arc<Prepared>> {
        let mut g = self.generations.lock().ok()?;
        let (new, old) = &mut *g;
        if let Some(p) = new.get(agent, tool) {
            return Some(p);
        }
        let p = old.take(agent, tool)?;
        Self::keep(&mut g, agent, tool, p.clone());
        Some(p)
    }

    fn put(&self, agent: &WorkloadIdentity, tool: &Tool, prepared: Arc<Prepared>) {
        if let Ok(mut g) = self.generations.lock() {
            Self::keep(&mut g, agent, tool, prepared);
        }
    }

    fn keep(
        g: &mut (Generation, Generation),
        agent: &WorkloadIdentity,
        tool: &Tool,
        prepared: Arc<Prepared>,
    ) {
        if g.0.len >= ENTITY_CACHE {
            g.1 = std::mem::take(&mut g.0);
        }
        g.0.insert(agent, tool, prepared);
    }

    /// How many entries each generation holds (new, old).
    #[cfg(test)]
    fn lens(&self) -> (usize, usize) {
        self.generations
            .lock()
            .map_or((0, 0), |g| (g.0.len, g.1.len))
    }
}

impl std::fmt::Debug for PolicyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyEngine")
            .field("policies", &self.count)
            .finish_non_exhaustive()
    }
}

/// A file's name and text.
type Source = (String, String);

/// How many directories down [`nested_files`] looks.
const NESTED_DEPTH: usize = 4;

/// The most entries [`nested_files`] lists (it runs at every poll).
const NESTED_ENTRIES: usize = 10_000;

/// Whether a path names a policy or schema file (`*.cedar`,
/// `*.cedarschema`) by its name.
#[must_use]
pub fn is_policy_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("cedar" | "cedarschema")
    )
}

/// The policy and schema files (`*.cedar`, `*.cedarschema`) below the
/// subdirectories of `dir`, to four levels down, sorted: links followed,
/// no directory listed twice.
/// scrip reads only `dir`'s own files, so a set with any of these is
/// refused rather than run without them: a `forbid` kept in `dir/team/`
/// would never apply. Directories whose names start with `.` are passed
/// over: a Kubernetes ConfigMap volume keeps its files in `..data` (and
/// links to them beside it), a checkout its history in `.git`. So is a
/// directory that cannot be listed (`lost+found` at a volume's root): scrip
/// could not read a file there either.
///
/// # Errors
/// [`PolicyError::Crowded`] past 10,000 entries: what was not looked
/// through could hide a policy file.
pub fn nested_files(dir: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    use std::os::unix::fs::MetadataExt as _;
    // Breadth first, each directory marked when it is queued: one reached
    // through a link deeper down is still walked from where it is nearest.
    let mut found = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut entries = 0_usize;
    let mut queue = std::collections::VecDeque::from([(dir.to_owned(), 0_usize)]);
    if let Ok(meta) = std::fs::metadata(dir) {
        seen.insert((meta.dev(), meta.ino()));
    }
    while let Some((at, depth)) = queue.pop_front() {
        let Ok(listed) = std::fs::read_dir(&at) else {
            continue;
        };
        for entry in listed.filter_map(Result::ok) {
            entries += 1;
            if entries > NESTED_ENTRIES {
                return Err(PolicyError::Crowded(at));
            }
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            if depth > 0 && is_policy_file(&path) {
                found.push(path);
                continue;
            }
            if depth < NESTED_DEPTH
                && let Ok(meta) = std::fs::metadata(&path)
                && meta.is_dir()
                && seen.insert((meta.dev(), meta.ino()))
            {
                queue.push_back((path, depth + 1));
            }
        }
    }
    found.sort();
    Ok(found)
}

fn read_dir_files(dir: &Path) -> Result<(Vec<Source>, Option<Source>), PolicyError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| PolicyError::Io { path, source }
    };
    // An entry that cannot be listed (EIO on a network file system) fails
    // the load: skipping it could drop the file of `forbid` rules.
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(io(dir))?;
    entries.sort();
    if let Some(nested) = nested_files(dir)?.into_iter().next() {
        return Err(PolicyError::Nested(nested));
    }
    let mut policies = Vec::new();
    let mut schema = None;
    for path in entries {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        match path.extension().and_then(|e| e.to_str()) {
            Some("cedar") => {
                let text = std::fs::read_to_string(&path).map_err(io(&path))?;
                policies.push((name, text));
            }
            Some("cedarschema") => {
                if schema.is_some() {
                    return Err(PolicyError::SeveralSchemas(dir.to_owned()));
                }
                let text = std::fs::read_to_string(&path).map_err(io(&path))?;
                schema = Some((name, text));
            }
            _ => {}
        }
    }
    Ok((policies, schema))
}

/// [`PolicyEngine::digest`] of a schema and policy files: each name and
/// text with its length before it, so no two sets run together alike.
fn set_digest(schema: (&str, &str), files: &[(String, String)]) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for (name, text) in
        std::iter::once(schema).chain(files.iter().map(|(n, t)| (n.as_str(), t.as_str())))
    {
        for part in [name, text] {
            ctx.update(&(part.len() as u64).to_be_bytes());
            ctx.update(part.as_bytes());
        }
    }
    let hex: String = ctx
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

impl PolicyEngine {
    /// Loads and validates `dir`. A missing directory yields the built-in
    /// schema and no policies, which denies everything.
    ///
    /// # Errors
    /// [`PolicyError`] on any unreadable, unparsable or invalid file.
    pub fn load(dir: &Path) -> Result<Self, PolicyError> {
        if !dir.exists() {
            return Self::from_sources(None, &[]);
        }
        Self::load_dir(dir)
    }

    /// Loads and validates `dir`, which must be there: a caller that
    /// decided whether it is (and checked who can write it) is not handed
    /// an empty set for a directory gone since, or another's directory put
    /// in its place when it was missing.
    ///
    /// # Errors
    /// [`PolicyError`] on a missing directory, or any unreadable,
    /// unparsable or invalid file.
    pub fn load_dir(dir: &Path) -> Result<Self, PolicyError> {
        let (policies, schema) = read_dir_files(dir)?;
        let schema = schema.as_ref().map(|(n, t)| (n.as_str(), t.as_str()));
        Self::from_sources(schema, &policies)
    }

    /// Builds an engine from a schema (`(file name, text)`, or the built-in
    /// one) and policy files (`(file name, text)`).
    ///
    /// # Errors
    /// [`PolicyError`] on any parse or validation error.
    pub fn from_sources(
        schema: Option<(&str, &str)>,
        files: &[(String, String)],
    ) -> Result<Self, PolicyError> {
        let (schema_name, schema_text) = schema.unwrap_or(("built-in schema", DEFAULT_SCHEMA));
        let digest = set_digest((schema_name, schema_text), files);
        let (schema, _warnings) =
            Schema::from_cedarschema_str(schema_text).map_err(|e| PolicyError::Schema {
                name: schema_name.to_owned(),
                message: e.to_string(),
            })?;
        // Requests name an action by its id alone, so two namespaces'
        // actions of one id would be one action here, which of them
        // depending on the order they are listed in.
        let mut ids = std::collections::BTreeSet::new();
        for action in schema.actions() {
            let id = action.id().unescaped();
            if !ids.insert(id.to_owned()) {
                return Err(PolicyError::Schema {
                    name: schema_name.to_owned(),
                    message: format!(
                        "action `{id}` is declared in more than one namespace; scrip names actions by id alone, so give each a name of its own"
                    ),
                });
            }
        }
        // scrip builds agents and tools without parents. A schema that
        // declares some would validate `principal in Team::"x"` (or
        // `resource in ...`), which then never holds: a `forbid` scoped so
        // would silently never apply.
        for ty in ["Agent", "Tool"] {
            let name =
                cedar_policy::EntityTypeName::from_str(ty).map_err(|e| PolicyError::Schema {
                    name: schema_name.to_owned(),
                    message: e.to_string(),
                })?;
            if let Some(parent) = schema.ancestors(&name).and_then(|mut a| a.next()) {
                return Err(PolicyError::Schema {
                    name: schema_name.to_owned(),
                    message: format!(
                        "entity {ty} is declared `in [{parent}]`, but scrip gives every {ty} no parents, so `in {parent}::\"...\"` would never hold (a `forbid` scoped so would never apply); match on the agent's attributes and tags or the tool's labels instead"
                    ),
                });
            }
        }
        let declared = declared_in(schema_text).unwrap_or_default();
        if schema_text != DEFAULT_SCHEMA
            && let Some(extra) = unfilled_attribute(schema_text)
        {
            return Err(PolicyError::Schema {
                name: schema_name.to_owned(),
                message: extra,
            });
        }
        let mut set = PolicySet::new();
        let mut count = 0;
        for (name, text) in files {
            let parsed = PolicySet::from_str(text).map_err(|e| PolicyError::Parse {
                name: name.clone(),
                message: e.to_string(),
            })?;
            if parsed.templates().next().is_some() {
                return Err(PolicyError::Parse {
                    name: name.clone(),
                    message: "templates are not supported".into(),
                });
            }
            let stem = name.strip_suffix(".cedar").unwrap_or(name);
            for (n, policy) in parsed.policies().enumerate() {
                let id = policy
                    .annotation("id")
                    .map_or_else(|| format!("{stem}:{n}"), str::to_owned);
                let policy = policy.new_id(PolicyId::new(&id));
                set.add(policy).map_err(|_| PolicyError::DuplicateId(id))?;
                count += 1;
            }
        }
        let result = Validator::new(schema.clone()).validate(&set, ValidationMode::Strict);
        if !result.validation_passed() {
            let messages: Vec<String> = result
                .validation_errors()
                .map(|e| format!("  - {e}"))
                .collect();
            return Err(PolicyError::Validation(messages.join("\n")));
        }
        // A `forbid` the validator finds can never apply (its condition is
        // always false for these types: `principal in Team::"..."` when
        // agents have no parents; no action of its scope applies to its
        // principal and resource) would be a rule that silently does
        // nothing: refused. (A `permit` so is only a permit that never
        // allows.)
        let dead: Vec<String> = result
            .validation_warnings()
            .filter(|w| {
                matches!(
                    w,
                    cedar_policy::ValidationWarning::ImpossiblePolicy(_)
                        | cedar_policy::ValidationWarning::InvalidActionApplication(_)
                ) && set
                    .policy(w.policy_id())
                    .is_some_and(|p| p.effect() == cedar_policy::Effect::Forbid)
            })
            .map(|w| format!("  - {w} (a `forbid` that can never apply would deny nothing)"))
            .collect();
        if !dead.is_empty() {
            return Err(PolicyError::Validation(dead.join("\n")));
        }
        let actions = schema
            .actions()
            .map(|a| {
                let id = a.id().unescaped().to_owned();
                let action = SchemaAction {
                    uid: a.clone(),
                    checked: AtomicU64::new(0),
                    fills_dpop: declared
                        .contains(&(format!("{ACTION_PLACE}{id}"), "dpop_jkt".to_owned())),
                    fills_issuers: declared.contains(&(
                        format!("{ACTION_PLACE}{id}"),
                        "delegation_issuers".to_owned(),
                    )),
                };
                (id, action)
            })
            .collect();
        let guards = Guards::new(&set);
        let selections = select(&schema, &set, &guards)?;
        Ok(Self {
            schema,
            policies: set,
            selections,
            guards,
            authorizer: Authorizer::new(),
            actions,
            count,
            entities: EntityCache::default(),
            digest,
        })
    }

    /// The number of policies.
    #[must_use]
    pub fn len(&self) -> usize {
        self.count
    }

    /// `sha256:<hex>` of the set's files as read (the schema's name and
    /// text, then each policy file's, in name order): the same on every
    /// replica that loaded the same files, so the records and logs that
    /// name it say which set decided.
    #[must_use]
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Whether there are no policies (everything is denied).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Checks that every configured tool action is a Cedar action, and that
    /// no `forbid` is scoped to a tool that is not configured: a misspelt
    /// tool name there (`Tool::"githib"`) would make the forbid apply to
    /// nothing, without a word from Cedar's validator, which knows no tool
    /// names.
    ///
    /// # Errors
    /// [`PolicyError::UndeclaredAction`] or [`PolicyError::UnknownTool`] for
    /// the first problem.
    pub fn check_tools(&self, tools: &[Tool]) -> Result<(), PolicyError> {
        // Declared, and for an agent at a tool: a group, or an action for
        // other types, would fail every request (denied, with a warning).
        let requestable = |name: &str| {
            self.actions.get(name).is_some_and(|a| {
                self.schema
                    .principals_for_action(&a.uid)
                    .is_some_and(|mut p| p.any(|t| t.to_string() == "Agent"))
                    && self
                        .schema
                        .resources_for_action(&a.uid)
                        .is_some_and(|mut r| r.any(|t| t.to_string() == "Tool"))
            })
        };
        for tool in tools {
            for action in &tool.actions {
                if !requestable(action.as_str()) {
                    return Err(PolicyError::UndeclaredAction {
                        tool: tool.name.to_string(),
                        action: action.to_string(),
                    });
                }
            }
        }
        for policy in self.policies.policies() {
            if policy.effect() == cedar_policy::Effect::Forbid
                && let ToolScope::One(tool) = tool_scope(policy)
                && !tools.iter().any(|t| t.name.as_str() == tool)
            {
                return Err(PolicyError::UnknownTool {
                    policy: policy.id().to_string(),
                    tool: tool.chars().take(64).flat_map(char::escape_debug).collect(),
                });
            }
        }
        Ok(())
    }

    /// Decides one request, evaluating only the policies that can apply to
    /// its action and tool. Any failure to build it denies.
    #[must_use]
    pub fn decide(&self, req: &DecisionRequest<'_>) -> Decision {
        let selected = self
            .selections
            .get(req.action.as_str())
            .map(|s| s.by_tool.get(req.tool.name.as_str()).unwrap_or(&s.other));
        // An action the schema does not declare has no selection; the full
        // set is passed and `try_decide` denies it before evaluating.
        self.decide_with(req, selected)
    }

    /// Decides one request by evaluating every policy, without the
    /// selection by action and tool: the reference that [`Self::decide`]
    /// must agree with, for tests and benchmarks.
    #[must_use]
    pub fn decide_evaluating_all(&self, req: &DecisionRequest<'_>) -> Decision {
        self.decide_with(req, None)
    }

    /// Decides over `selected`, or over every policy when `None`.
    fn decide_with(&self, req: &DecisionRequest<'_>, selected: Option<&Selected>) -> Decision {
        match self.try_decide(req, selected) {
            Ok(d) => d,
            Err(reason) => {
                // Cedar's message may quote what the request holds (a
                // claim, the purpose, a path): the audit record, which
                // holds those anyway, keeps it; the log says it at `debug`
                // only, and warns at most a few times a second.
                tracing::debug!(%reason, "policy request could not be evaluated");
                if warn_now() {
                    tracing::warn!(
                        action = req.action.as_str(),
                        tool = req.tool.name.as_str(),
                        "policy request could not be evaluated (the schema and the request differ; SCRIP_LOG=scrip_policy=debug says how); denied"
                    );
                }
                Decision::deny(format!("policy request could not be evaluated: {reason}"))
            }
        }
    }

    fn try_decide(
        &self,
        req: &DecisionRequest<'_>,
        selected: Option<&Selected>,
    ) -> Result<Decision, String> {
        let Some(action) = self.actions.get(req.action.as_str()) else {
            return Ok(Decision::deny(format!(
                "action `{}` is not declared in the policy schema",
                req.action
            )));
        };
        let prepared = self.prepared(req.agent, req.tool)?;
        let narrowed = selected
            .map(|s| s.for_agent(prepared.has))
            .transpose()?
            .flatten();
        let policies = match (&narrowed, selected) {
            (Some(narrowed), _) => narrowed.as_ref(),
            (None, Some(s)) => &s.all,
            (None, None) => &self.policies,
        };
        let ticket = find_ticket(&req.context.purpose);
        let dpop = req
            .context
            .dpop_jkt
            .as_deref()
            .filter(|_| action.fills_dpop);
        let issuers = action
            .fills_issuers
            .then_some(req.context.delegation_issuers.as_slice());
        let shape = ContextShape::of(req.context, ticket.is_some(), dpop.is_some(), issuers).bit();
        let checked = action.checked.load(Ordering::Relaxed) & shape != 0;
        let request = Request::new(
            prepared.principal.clone(),
            action.uid.clone(),
            prepared.resource.clone(),
            context(req.context, ticket, dpop, issuers)?,
            // Checked against the schema the first time this shape comes
            // up; a shape that failed is checked (and denied) every time.
            (!checked).then_some(&self.schema),
        )
        .map_err(|e| e.to_string())?;
        if !checked {
            action.checked.fetch_or(shape, Ordering::Relaxed);
        }
        let response = self
            .authorizer
            .is_authorized(&request, policies, &prepared.entities);
        let diagnostics = response.diagnostics();
        if let Some(e) = diagnostics.errors().next() {
            // An erroring policy is skipped by Cedar; scrip denies instead.
            return Ok(Decision::deny(format!("policy evaluation error: {e}")));
        }
        let mut policies: Vec<String> = diagnostics.reason().map(ToString::to_string).collect();
        policies.sort_unstable();
        let allowed = response.decision() == CedarDecision::Allow;
        let reason = match (allowed, policies.is_empty()) {
            (true, _) => format!("permitted by {}", policies.join(", ")),
            (false, true) => "no policy permits it".to_owned(),
            (false, false) => format!("forbidden by {}", policies.join(", ")),
        };
        Ok(Decision {
            allowed,
            policies,
            reason,
        })
    }
}

impl PolicyEngine {
    /// The agent's and tool's entities, from the cache or built and checked
    /// against the schema now.
    fn prepared(&self, agent: &WorkloadIdentity, tool: &Tool) -> Result<Arc<Prepared>, String> {
        if let Some(p) = self.entities.get(agent, tool) {
            return Ok(p);
        }
        let principal = uid("Agent", &agent.subject)?;
        let resource = uid("Tool", tool.name.as_str())?;
        let entities = Entities::from_entities(
            [
                agent_entity(principal.clone(), agent)?,
                tool_entity(resource.clone(), tool)?,
            ],
            Some(&self.schema),
        )
        .map_err(|e| e.to_string())?;
        // Read from the entity Cedar evaluates, so the bits cannot disagree
        // with what `principal has` finds.
        let agent_entity = entities.get(&principal);
        let has = self
            .guards
            .bits(|name| agent_entity.is_some_and(|e| e.attr(name).is_some()));
        let prepared = Arc::new(Prepared {
            principal,
            resource,
            entities,
            has,
        });
        self.entities.put(agent, tool, prepared.clone());
        Ok(prepared)
    }
}

fn uid(ty: &str, id: &str) -> Result<EntityUid, String> {
    let ty = cedar_policy::EntityTypeName::from_str(ty).map_err(|e| e.to_string())?;
    Ok(EntityUid::from_type_name_and_id(
        ty,
        cedar_policy::EntityId::new(id),
    ))
}

fn text(s: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(s.to_owned())
}

fn agent_entity(uid: EntityUid, agent: &WorkloadIdentity) -> Result<Entity, String> {
    let mut attrs = vec![
        ("issuer".to_owned(), text(&agent.issuer)),
        ("subject".to_owned(), text(&agent.subject)),
        ("kind".to_owned(), text(agent.kind.as_str())),
    ];
    attrs.extend(agent.attributes.iter().map(|(k, v)| (k.clone(), text(v))));
    let tags = agent.claims.iter().map(|(k, v)| (k.clone(), text(v)));
    Entity::new_with_tags(uid, attrs, [], tags).map_err(|e| e.to_string())
}

fn tool_entity(uid: EntityUid, tool: &Tool) -> Result<Entity, String> {
    let attrs = [
        ("name".to_owned(), text(tool.name.as_str())),
        ("resource".to_owned(), text(&tool.resource)),
    ];
    let tags = tool.labels.iter().map(|(k, v)| (k.clone(), text(v)));
    Entity::new_with_tags(uid, attrs, [], tags).map_err(|e| e.to_string())
}

fn context(
    c: &RequestContext,
    ticket: Option<&str>,
    dpop_jkt: Option<&str>,
    issuers: Option<&[String]>,
) -> Result<Context, String> {
    let mut pairs = vec![
        ("stage".to_owned(), text(c.stage.as_str())),
        ("purpose".to_owned(), text(&c.purpose)),
        ("environment".to_owned(), text(&c.environment)),
        (
            "delegation_depth".to_owned(),
            RestrictedExpression::new_long(i64::from(c.delegation_depth)),
        ),
        (
            "delegation_chain".to_owned(),
            RestrictedExpression::new_set(c.delegation_chain.iter().map(|s| text(s))),
        ),
        (
            "now".to_owned(),
            RestrictedExpression::new_long(i64::try_from(c.now).unwrap_or(i64::MAX)),
        ),
        (
            "approved".to_owned(),
            RestrictedExpression::new_bool(c.approved),
        ),
    ];
    if let Some(ticket) = ticket {
        pairs.push(("ticket".to_owned(), text(ticket)));
    }
    if let Some(method) = &c.method {
        pairs.push(("method".to_owned(), text(method)));
    }
    if let Some(path) = &c.path {
        pairs.push(("path".to_owned(), text(path)));
    }
    if let Some(jkt) = dpop_jkt {
        pairs.push(("dpop_jkt".to_owned(), text(jkt)));
    }
    if let Some(issuers) = issuers {
        pairs.push((
            "delegation_issuers".to_owned(),
            RestrictedExpression::new_set(issuers.iter().map(|s| text(s))),
        ));
    }
    Context::from_pairs(pairs).map_err(|e| e.to_string())
}

/// Warnings that a request could not be evaluated logged at most in one
/// second: every request of a kind fails alike, and the log must not grow
/// with the traffic.
const WARNINGS_PER_SECOND: u32 = 5;

/// Whether one more such warning may be logged now.
fn warn_now() -> bool {
    static SECOND: std::sync::Mutex<(u64, u32)> = std::sync::Mutex::new((0, 0));
    let second = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut s = match SECOND.lock() {
        Ok(s) => s,
        Err(poisoned) => poisoned.into_inner(),
    };
    if s.0 != second {
        *s = (second, 0);
    }
    s.1 = s.1.saturating_add(1);
    s.1 <= WARNINGS_PER_SECOND
}

/// The first ticket id in `text`: a word of the form `ABC-123` (an
/// uppercase letter, uppercase letters or digits, a hyphen, digits).
#[must_use]
pub fn find_ticket(text: &str) -> Option<&str> {
    tickets(text).next()
}

/// Every ticket id in `text`, in order (see [`find_ticket`]).
pub fn tickets(text: &str) -> impl Iterator<Item = &str> {
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    text.split(move |c: char| !is_word(c)).filter(|word| {
        let Some((project, number)) = word.split_once('-') else {
            return false;
        };
        let mut p = project.chars();
        p.next().is_some_and(|c| c.is_ascii_uppercase())
            && project.len() >= 2
            && p.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
            && !number.is_empty()
            && number.chars().all(|c| c.is_ascii_digit())
    })
}

/// The first attribute `schema_text` declares on an agent, a tool or an
/// action's context that scrip never fills (the built-in schema declares
/// every one it fills), as a message; `None` when there is none, or when
/// the text does not parse (the schema's own parse reports that). A
/// policy on such an attribute would validate and then never see it: `has`
/// always false, so a `forbid` guarded by it would silently never apply.
fn unfilled_attribute(schema_text: &str) -> Option<String> {
    let filled = declared_in(DEFAULT_SCHEMA)?;
    declared_in(schema_text)?
        .into_iter()
        .filter(|(place, _)| !place.starts_with(ACTION_PLACE))
        .find(|(place, name)| !filled.contains(&(place.clone(), name.clone())))
        .map(|(place, name)| {
            format!(
                "{place} declares attribute `{name}`, which scrip never fills, so `has {name}` would never hold (a `forbid` guarded by it would never apply); a claim is a tag (`principal.getTag(\"{name}\")`), a tool's labels are tags"
            )
        })
}

/// [`declared_attributes`] of a schema's text; `None` when it does not
/// parse.
fn declared_in(schema_text: &str) -> Option<std::collections::BTreeSet<(String, String)>> {
    cedar_policy::SchemaFragment::from_cedarschema_str(schema_text)
        .ok()
        .and_then(|(f, _)| f.to_json_value().ok())
        .map(|json| declared_attributes(&json))
}

/// [`declared_attributes`]' place of the attributes of actions' contexts.
const CONTEXT_PLACE: &str = "the context of actions";

/// [`declared_attributes`]' place of the attributes of one action's
/// context, before the action's id.
const ACTION_PLACE: &str = "the context of action ";

/// `(place, attribute)` for each top-level attribute of the `Agent` and
/// `Tool` entity types (of the empty namespace, the ones scrip builds) and
/// of every action's context, in a schema's JSON form. `place` names the
/// entity type, or [`CONTEXT_PLACE`] for every action alike; each
/// action's are also under [`ACTION_PLACE`] and its id.
fn declared_attributes(json: &serde_json::Value) -> std::collections::BTreeSet<(String, String)> {
    use serde_json::Value;
    let mut out = std::collections::BTreeSet::new();
    let Some(namespaces) = json.as_object() else {
        return out;
    };
    // A record's attribute names, the record given inline or as a common
    // type (`R` in the namespace `ns` or the empty one, or `ns::R`), which
    // may itself name another (`type Request = Base;`).
    let attributes = |ty: &Value, ns: &str| -> Vec<String> {
        let mut ty = ty;
        let mut ns = ns.to_owned();
        // Cedar refuses cycles among common types; the bound is for safety.
        for _ in 0..32 {
            let name = match ty.get("type").and_then(Value::as_str) {
                Some("Record") => {
                    return ty
                        .get("attributes")
                        .and_then(Value::as_object)
                        .map(|a| a.keys().cloned().collect())
                        .unwrap_or_default();
                }
                Some("EntityOrCommon" | "CommonType") => {
                    ty.get("name").and_then(Value::as_str).unwrap_or_default()
                }
                Some(name) => name,
                None => return Vec::new(),
            };
            let (space, local) = name.rsplit_once("::").unwrap_or((ns.as_str(), name));
            let found = [space, ""].into_iter().find_map(|space| {
                let t = namespaces.get(space)?.get("commonTypes")?.get(local)?;
                Some((space.to_owned(), t))
            });
            let Some((space, next)) = found else {
                return Vec::new();
            };
            ns = space;
            ty = next;
        }
        Vec::new()
    };
    for (ns, body) in namespaces {
        if ns.is_empty() {
            for ty in ["Agent", "Tool"] {
                if let Some(shape) = body.pointer(&format!("/entityTypes/{ty}/shape")) {
                    for name in attributes(shape, ns) {
                        out.insert((format!("entity {ty}"), name));
                    }
                }
            }
        }
        let actions = body.get("actions").and_then(Value::as_object);
        for (id, action) in actions.into_iter().flatten() {
            if let Some(context) = action.pointer("/appliesTo/context") {
                for name in attributes(context, ns) {
                    out.insert((format!("{ACTION_PLACE}{id}"), name.clone()));
                    out.insert((CONTEXT_PLACE.to_owned(), name));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{
        ENTITY_CACHE, PolicyEngine, WARNINGS_PER_SECOND, find_ticket, set_digest, warn_now,
    };
    use std::sync::Arc;

    /// A set's digest is its files' names and texts: the same files, the
    /// same digest; any byte, name or boundary moved, another.
    #[test]
    fn a_sets_digest_names_its_files() {
        let files = |list: &[(&str, &str)]| -> Vec<(String, String)> {
            list.iter()
                .map(|(n, t)| ((*n).to_owned(), (*t).to_owned()))
                .collect()
        };
        let schema = ("s", "schema");
        let one = set_digest(schema, &files(&[("a.cedar", "permit"), ("b.cedar", "x")]));
        assert!(one.starts_with("sha256:") && one.len() == 7 + 64, "{one}");
        assert_eq!(
            one,
            set_digest(schema, &files(&[("a.cedar", "permit"), ("b.cedar", "x")]))
        );
        for other in [
            set_digest(schema, &files(&[("a.cedar", "permit"), ("b.cedar", "y")])),
            set_digest(schema, &files(&[("a.cedar", "permit"), ("c.cedar", "x")])),
            set_digest(schema, &files(&[("a.cedar", "permi"), ("b.cedar", "tx")])),
            set_digest(
                ("s", "schema2"),
                &files(&[("a.cedar", "permit"), ("b.cedar", "x")]),
            ),
            set_digest(schema, &files(&[("a.cedar", "permit")])),
            // The same bytes, framed otherwise.
            set_digest(schema, &files(&[("a.cedar", "permitb.cedarx")])),
        ] {
            assert_ne!(one, other);
        }
    }

    /// A flood of requests that cannot be evaluated warns a few times a
    /// second, not once each.
    #[test]
    fn warnings_of_unevaluable_requests_are_limited() {
        let warned = (0..1000).filter(|_| warn_now()).count();
        // Within one second, or across one boundary.
        let most = usize::try_from(2 * WARNINGS_PER_SECOND).unwrap_or(usize::MAX);
        assert!((1..=most).contains(&warned), "{warned}");
    }

    /// The ids of the policies a decision for `action` at `tool` evaluates.
    fn selected(engine: &PolicyEngine, action: &str, tool: &str) -> Vec<String> {
        let selection = &engine.selections[action];
        let set = selection.by_tool.get(tool).unwrap_or(&selection.other);
        let mut ids: Vec<String> = set.all.policies().map(|p| p.id().to_string()).collect();
        ids.sort_unstable();
        ids
    }

    #[test]
    fn selection_keeps_only_the_policies_that_can_apply() {
        let text = r#"
            @id("any") permit (principal, action, resource);
            @id("read-github") permit (principal, action == Action::"read", resource == Tool::"github");
            @id("write-anywhere") permit (principal, action == Action::"write", resource is Tool);
            @id("jira-read-delete") forbid (principal, action in [Action::"read", Action::"delete"], resource in Tool::"jira");
        "#;
        let engine = PolicyEngine::from_sources(None, &[("t.cedar".into(), text.into())])
            .expect("valid policies");
        assert_eq!(selected(&engine, "read", "github"), ["any", "read-github"]);
        assert_eq!(
            selected(&engine, "read", "jira"),
            ["any", "jira-read-delete"]
        );
        assert_eq!(selected(&engine, "read", "slack"), ["any"]);
        assert_eq!(
            selected(&engine, "write", "github"),
            ["any", "write-anywhere"]
        );
        assert_eq!(
            selected(&engine, "delete", "jira"),
            ["any", "jira-read-delete"]
        );
        assert_eq!(selected(&engine, "execute", "jira"), ["any"]);
    }

    /// `github`, with `read` only.
    fn github_read() -> scrip_config::Tool {
        scrip_config::Tool {
            name: scrip_token::ToolName::parse("github").expect("tool name"),
            resource: "https://api.github.com".into(),
            actions: vec![scrip_token::ActionName::parse("read").expect("action")],
            labels: std::collections::BTreeMap::new(),
            introspectors: Vec::new(),
        }
    }

    /// The agents in use stay kept however many others pass, no generation
    /// holds more than [`ENTITY_CACHE`], and one not used for two
    /// generations is built again.
    #[test]
    fn the_entities_in_use_stay_kept_while_many_others_pass() {
        let engine = PolicyEngine::from_sources(
            None,
            &[(
                "t.cedar".into(),
                "permit (principal, action, resource);".into(),
            )],
        )
        .expect("valid policies");
        let tool = github_read();
        let agent = |sub: &str| {
            let claims = serde_json::json!({ "sub": sub });
            let claims = claims.as_object().cloned().unwrap_or_default();
            scrip_token::WorkloadIdentity::from_claims("https://idp", &claims).expect("identity")
        };
        let hot = agent("hot");
        let cold = agent("cold");
        let first = engine.prepared(&hot, &tool).expect("entities");
        let cold_first = engine.prepared(&cold, &tool).expect("entities");
        for i in 0..3 * ENTITY_CACHE {
            engine
                .prepared(&agent(&format!("passing-{i}")), &tool)
                .expect("entities");
            if i % 100 == 0 {
                let again = engine.prepared(&hot, &tool).expect("entities");
                assert!(Arc::ptr_eq(&first, &again), "built again after {i} others");
            }
            let (new, old) = engine.entities.lens();
            assert!(new <= ENTITY_CACHE && old <= ENTITY_CACHE, "{new} + {old}");
        }
        let (new, old) = engine.entities.lens();
        assert!(new + old > ENTITY_CACHE, "kept too few: {new} + {old}");
        let cold_again = engine.prepared(&cold, &tool).expect("entities");
        assert!(!Arc::ptr_eq(&cold_first, &cold_again), "never forgotten");
    }

    #[test]
    fn an_agent_without_a_tested_attribute_skips_the_policies_that_test_it() {
        let text = r#"
            @id("any") permit (principal, action == Action::"read", resource);
            @id("ns") permit (principal, action == Action::"read", resource)
              when { principal has namespace && principal.namespace == "agents" };
        "#;
        let engine = PolicyEngine::from_sources(None, &[("t.cedar".into(), text.into())])
            .expect("valid policies");
        let tool = github_read();
        let agent = |claims: serde_json::Value| {
            let claims = claims.as_object().cloned().unwrap_or_default();
            scrip_token::WorkloadIdentity::from_claims("https://idp", &claims).expect("identity")
        };
        let k8s = agent(serde_json::json!({"sub": "k", "kubernetes.io": {"namespace": "agents"}}));
        let github = agent(serde_json::json!({"sub": "g", "repository": "a/b", "workflow": "ci"}));
        let selected = &engine.selections["read"].other;
        let evaluated = |who: &scrip_token::WorkloadIdentity| {
            let prepared = engine.prepared(who, &tool).expect("entities");
            let set = selected.for_agent(prepared.has).expect("narrowed");
            let mut ids: Vec<String> = set
                .as_deref()
                .unwrap_or(&selected.all)
                .policies()
                .map(|p| p.id().to_string())
                .collect();
            ids.sort_unstable();
            ids
        };
        assert_eq!(evaluated(&k8s), ["any", "ns"]);
        assert_eq!(evaluated(&github), ["any"]);
    }

    #[test]
    fn tickets() {
        let check =
            |text: &str, want: Option<&str>| assert_eq!(find_ticket(text), want, "{text:?}");
        check("fix JIRA-123 now", Some("JIRA-123"));
        check("JIRA-123", Some("JIRA-123"));
        check("(see OPS2-7)", Some("OPS2-7"));
        check("jira-123", None);
        check("JIRA-", None);
        check("JIRA-12a", None);
        check("J-12", None);
        check("ab JIRA-1-2 PROJ-9", Some("PROJ-9"));
        check("", None);
    }
}
