//! A bank of named LoRA adapters over one frozen base, PEFT-compatible.
