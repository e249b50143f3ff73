"""Worker processes: transfer, unpack, gpu. Each runs as python -m audio_pipeline.workers.<name>."""
