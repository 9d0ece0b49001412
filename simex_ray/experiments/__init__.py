"""Paper protocols as functions: (specs, config) -> result dict, written as JSON/Parquet/PNG."""
