//! Multi-node tests: a real Docker Swarm of docker-in-docker nodes on this one host (see `harness`), the
//! images moved in without a registry, faults injected as they happen to machines. One binary, run by the
//! same `cargo test` as everything else; `smoke` first (libtest runs tests in name order), then the
//! scenarios built on `harness::stack`.

mod harness;

mod smoke;

mod smoke_faults;

mod scenarios;
