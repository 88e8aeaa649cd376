//! The AdapterDeployment reconciler: `resolve` (versions → URIs and digests) → `compat`
//! (checked against the server before loading) → `rollout` (through each pod's admin API,
//! `admin`) → `status` (pure). `controller` wires them together.

mod admin;
mod compat;
mod controller;
mod resolve;
mod rollout;
mod status;

pub use controller::{
    ADMIN_PORT_ANNOTATION, Context, Error, FINALIZER, SERVER_LABEL, Settings,
    TOKEN_SECRET_ANNOTATION, controller,
};
