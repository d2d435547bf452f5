//! Benchmarks of the origin link: a seeded impairment model ([`impair`]), a UDP proxy that
//! applies it ([`proxy`]), a latency measurement over the real origin and subscriber
//! ([`latency`]), a comparison of ways to map media onto QUIC ([`mapping`]); [`nft`]
//! injects the loss with nftables instead, to cross-check the model.

pub mod impair;
pub mod latency;
pub mod mapping;
pub mod nft;
pub mod proxy;
