"""What the tests share: the local-stack fixtures (``stack``, loaded as a pytest plugin
by tests/conftest.py), row factories for the pipeline's tables (``rows``), the RA
app's test helpers (``web``), crafted archives (``malicious_tars``), hostile media
(``hostile_media``), real speech and tones made with espeak-ng and ffmpeg (``media``),
headless Chromium (``browser_kit``), what Ansible would render (``ansible_render``),
ansible-playbook run for real (``ansible_run``) and the worker kit (``workerkit``: a
test queue worker and helpers to run workers as processes)."""
