"""Model family. Importing this package stays torch-free: config, registry, sizes and counting
are pure Python so that planning never pays for importing torch. Build models with
`isoflop.models.lm.build_model`."""
