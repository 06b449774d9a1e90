//! What a rule does when it fires, and carrying it out.
//!
//! Owns: the [`Action`] types, their checks (part of a rule's validation), and turning a
//! [`Firing`] into alerts, patches and compute invocations.
//! Exposes: [`Action`], [`Target`], [`Invoker`] (installed by the WebAssembly layer).
//! Must never: change a twin except through the registry's write path, block the rule
//! engine's follow loop on a patch or an invocation (both run on their own tasks; an
//! invocation waits for a slot of the compute pool in its rule's bounded queue, and one that
//! gets none fails as `busy`), or drop a failed action silently (each is counted on its rule).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::{Firing, Rules};
use crate::events::log::{Event, EventType};
use crate::registry::Update;
use crate::types::{Actor, Cause, Properties, Severity, TwinId, World};

/// Most actions one rule carries out per firing.
pub const MAX_ACTIONS: usize = 16;

/// What a rule does when it fires.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// Emit an `alert` event.
    Alert {
        #[serde(default)]
        severity: Severity,
        #[serde(default)]
        message: Option<String>,
    },
    /// Merge-patch the twin that triggered the rule (`target: "twin"`, the default) or its
    /// parent (`"parent"`), through the registry's write path.
    Patch {
        #[serde(default)]
        target: Target,
        #[schema(value_type = Object)]
        properties: Properties,
    },
    /// Invoke a compute module on the twin (or its parent); the result is an `alert` event
    /// of severity `info` carrying it.
    Invoke {
        module: String,
        #[serde(default)]
        target: Target,
        #[serde(default)]
        #[schema(value_type = Object)]
        parameters: Value,
    },
    /// Start a run of the stored workflow definition `workflow` (`PUT
    /// /v1/workflow-defs/{name}`), with the triggering twin as its input (`input.twin_id`,
    /// `entity_type`, `parent_id`, `rule`, `trigger_seq`, `details`).
    Workflow { workflow: String },
}

/// Which twin an action applies to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    #[default]
    Twin,
    Parent,
}

/// What an invocation resolves to: the result, or why there is none.
pub type InvokeFuture<T = Value> = Pin<Box<dyn Future<Output = Result<T, String>> + Send>>;

/// Starts stored workflows for `workflow` actions (installed by the workflow layer).
pub trait Starter: Send + Sync {
    /// Start a run of the definition `definition` with `input`: the run's id.
    fn start(&self, definition: String, input: Value) -> InvokeFuture<String>;
}

/// Runs compute modules for `invoke` actions (installed by the WebAssembly layer).
pub trait Invoker: Send + Sync {
    /// The world of module `name`, if uploaded.
    fn world_of(&self, name: &str) -> Option<World>;
    /// Invoke compute module `name` on one twin for rule `rule`, on the compute pool (the
    /// rule's own queue there); fails with a `busy: …` message when no slot frees up in
    /// time.
    fn invoke(
        self: Arc<Self>,
        rule: &str,
        name: &str,
        twin: TwinId,
        parameters: Value,
    ) -> InvokeFuture;
}

/// Check a rule's actions, adding every problem to `errors`.
pub(super) fn check(
    actions: &[Action],
    modules: &dyn Fn(&str) -> Option<World>,
    errors: &mut Vec<String>,
) {
    if actions.is_empty() {
        errors.push("actions: give at least one action".into());
    }
    if actions.len() > MAX_ACTIONS {
        errors.push(format!("actions: at most {MAX_ACTIONS}"));
    }
    for (i, a) in actions.iter().enumerate() {
        match a {
            Action::Alert { .. } => {}
            Action::Patch { properties, .. } => {
                if properties.is_empty() {
                    errors.push(format!("actions[{i}].properties: an empty patch"));
                }
                if let Err(e) = crate::registry::check_patch(properties) {
                    errors.push(format!("actions[{i}].properties: {e}"));
                }
            }
            Action::Invoke { module, .. } => match modules(module) {
                None => errors.push(format!("actions[{i}].module: {module:?} is not uploaded")),
                Some(w) if w != World::Compute => errors.push(format!(
                    "actions[{i}].module: {module:?} implements the {w} world, not compute"
                )),
                Some(_) => {}
            },
            Action::Workflow { workflow } => {
                if let Err(e) = crate::registry::check_name("workflow name", workflow) {
                    errors.push(format!("actions[{i}].workflow: {e}"));
                }
            }
        }
    }
}

impl Rules {
    /// Carry out a firing's actions.
    pub(super) fn act(&self, f: Firing) {
        let Some(actions) = self
            .inner
            .specs
            .read()
            .get(&f.rule)
            .map(|s| s.actions().to_vec())
        else {
            return; // deleted since it fired
        };
        let cause = Arc::new(Cause {
            by: Actor::Rule(f.rule.clone()),
            depth: f.depth + 1,
        });
        for a in &actions {
            match a {
                Action::Alert { severity, message } => self.alert(&f, &cause, *severity, message),
                Action::Patch { target, properties } => {
                    if let Some(id) = self.target(&f, *target) {
                        self.patch(&f.rule, id, properties.clone(), &cause);
                    }
                }
                Action::Invoke {
                    module,
                    target,
                    parameters,
                } => {
                    if let Some(id) = self.target(&f, *target) {
                        self.invoke(&f, id, module, parameters, &cause);
                    }
                }
                Action::Workflow { workflow } => self.start_workflow(&f, workflow),
            }
        }
    }

    /// The twin an action targets; a `parent` target on a twin without one is a failure.
    fn target(&self, f: &Firing, target: Target) -> Option<TwinId> {
        match target {
            Target::Twin => Some(f.twin_id),
            Target::Parent => {
                if f.parent_id.is_none() {
                    self.failed(
                        &f.rule,
                        format!("twin {} has no parent to act on", f.twin_id),
                    );
                }
                f.parent_id
            }
        }
    }

    fn alert(&self, f: &Firing, cause: &Cause, severity: Severity, message: &Option<String>) {
        let message = message
            .clone()
            .unwrap_or_else(|| format!("rule {} fired on twin {}", f.rule, f.twin_id));
        self.inner.log.raise(vec![alert_event(
            f,
            cause,
            json!({"source": "rule", "rule": f.rule, "severity": severity,
                   "message": message, "details": f.details, "trigger_seq": f.trigger_seq}),
        )]);
    }

    /// Patch through the registry on a task of its own (the write path may wait).
    fn patch(&self, rule: &str, id: TwinId, properties: Properties, cause: &Arc<Cause>) {
        let update = Update {
            cause: Some(cause.clone()),
            ..Update::new(id, properties)
        };
        let me = self.clone();
        let rule = rule.to_owned();
        tokio::spawn(async move {
            if let Err(e) = me.inner.registry.patch(update).await {
                tracing::warn!(rule, error = %e, "rule patch failed");
                me.failed(&rule, format!("patch of twin {id} failed: {e}"));
            }
        });
    }

    /// Invoke a compute module on the compute pool; its result (or error, `busy` included)
    /// becomes an alert.
    fn invoke(&self, f: &Firing, id: TwinId, module: &str, params: &Value, cause: &Arc<Cause>) {
        let Some(inv) = self.inner.invoker.get().cloned() else {
            return;
        };
        let (me, module, params, f, cause) = (
            self.clone(),
            module.to_owned(),
            params.clone(),
            f.clone(),
            cause.clone(),
        );
        tokio::spawn(async move {
            let params = if params.is_null() { json!({}) } else { params };
            let (key, value, severity) = match inv.invoke(&f.rule, &module, id, params).await {
                Ok(v) => ("result", v, Severity::Info),
                Err(e) => {
                    me.failed(&f.rule, format!("invoke of {module} failed: {e}"));
                    ("error", Value::String(e), Severity::Warning)
                }
            };
            me.inner.log.raise(vec![alert_event(
                &f,
                &cause,
                json!({"source": "rule", "rule": f.rule, "severity": severity,
                       "message": format!("rule {} invoked {module}", f.rule),
                       "module": module, "twin_id": id, key: value,
                       "trigger_seq": f.trigger_seq}),
            )]);
        });
    }
}

impl Rules {
    /// Start the workflow definition `name` for the firing's twin, on a task of its own; a
    /// start refused (no such definition, a module gone, the node full) counts on the rule.
    fn start_workflow(&self, f: &Firing, name: &str) {
        let Some(starter) = self.inner.starter.get().cloned() else {
            self.failed(&f.rule, "workflows are not available on this node".into());
            return;
        };
        let input = json!({"twin_id": f.twin_id, "entity_type": f.entity_type,
                           "parent_id": f.parent_id, "rule": f.rule,
                           "trigger_seq": f.trigger_seq, "details": f.details});
        let (me, rule, name) = (self.clone(), f.rule.clone(), name.to_owned());
        tokio::spawn(async move {
            match starter.start(name.clone(), input).await {
                Ok(run) => {
                    tracing::debug!(rule, workflow = %name, run, "a rule started a workflow")
                }
                Err(e) => {
                    tracing::warn!(rule, workflow = %name, error = %e, "a rule's workflow did not start");
                    me.failed(&rule, format!("workflow {name} did not start: {e}"));
                }
            }
        });
    }
}

fn alert_event(f: &Firing, cause: &Cause, data: Value) -> Event {
    let mut a = Event::new(EventType::Alert, f.ts);
    a.twin_id = Some(f.twin_id);
    a.entity_type = f.entity_type.clone();
    a.parent_id = f.parent_id;
    a.cause = Some(cause.clone());
    a.data = Some(data);
    a
}
