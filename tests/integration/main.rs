//! loraplane integration tests, one module per area (ripgrep style: a single test binary).

mod common;

mod adapters;
mod default_model;
mod engine;
mod gguf;
mod http;
mod http_dummy;
mod http_hostile;
mod http_openai;
mod numerics;
