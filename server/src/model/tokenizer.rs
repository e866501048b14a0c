//! Tokenization and chat templates.
