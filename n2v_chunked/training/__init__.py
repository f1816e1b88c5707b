"""The training stage of n2v_chunked (issue 27)."""
