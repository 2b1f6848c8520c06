//! The flow DSL: nodes, the episode context, traces, exact replay, DOT/Mermaid export.
