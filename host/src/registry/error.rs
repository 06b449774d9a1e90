//! Errors of the registry's operations, each mapping to one row of API.md's status table.

use std::collections::BTreeMap;

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// 404: an unknown twin, model or relationship.
    #[error("{0} not found")]
    NotFound(String),
    /// 409: duplicate id, children without cascade, retired twin, …
    #[error("{0}")]
    Conflict(String),
    /// 412: the caller expected another version of the twin.
    #[error("version mismatch: expected version {expected}, the twin is at version {current}")]
    VersionMismatch { expected: u64, current: u64 },
    /// 409: a delete of one twin that has descendants, without deleting its subtree.
    #[error("twin {id} has {count} descendant(s); delete them first, or its whole subtree")]
    HasDescendants {
        id: crate::types::TwinId,
        count: usize,
    },
    /// 422: properties violate the entity type's model; one reason per property.
    #[error("{} propert{} failed validation: {}", .0.len(), if .0.len() == 1 { "y" } else { "ies" },
        .0.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join("; "))]
    Validation(BTreeMap<String, String>),
    /// 400: a request that cannot mean anything (bad names, bad query shape).
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl RegistryError {
    pub fn twin_not_found(id: impl std::fmt::Display) -> Self {
        RegistryError::NotFound(format!("twin {id}"))
    }
}
