"""The Ray Serve retrieve-then-rerank application (`serve run serve.app:build_app run_dir=RUN_DIR`)."""
