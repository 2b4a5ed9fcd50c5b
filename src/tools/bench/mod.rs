//! Benchmarks: the bare session ([`model`]), the whole pipeline ([`e2e`]), the host side alone
//! ([`host`]) and the priority lanes ([`lanes`]).

pub mod e2e;
pub mod host;
pub mod lanes;
pub mod model;

pub use e2e::{end_to_end, print_e2e, E2eOptions, E2eReport};
pub use host::{host_only, print_host, HostOptions, HostReport};
pub use lanes::{lanes, print_lanes, LanesOptions, LanesReport};
pub use model::{check_model, model_only, print_table};
