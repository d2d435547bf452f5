//! Benchmarks of the origin link: a seeded impairment model ([`impair`]), a UDP proxy that
//! applies it ([`proxy`]), a latency measurement over the real origin and subscriber
//! ([`latency`]), and a comparison of ways to map media onto QUIC ([`mapping`]).

pub mod impair;
pub mod latency;
pub mod mapping;
pub mod proxy;
