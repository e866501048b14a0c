//! loraplane integration tests, one module per area (ripgrep style: a single test binary).

mod adapters;
mod numerics;
