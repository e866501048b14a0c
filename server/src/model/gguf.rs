//! GGUF model files: parsing, dequantization and conversion to the HF layout.
