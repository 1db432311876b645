//! The process (SPEC §9–§10): start order, supervision of every task,
//! signals and systemd (`lifecycle`), and the HTTP endpoints `/metrics`,
//! `/healthz`, `/readyz` (`http`). The top of the house: it may import
//! every stage below it and nothing imports it but `main.rs`.

mod http;
pub mod lifecycle;
