"""What the tests share: the local-stack fixtures (``stack``, loaded as a pytest plugin
by tests/conftest.py), row factories for the pipeline's tables (``rows``), the RA
app's test helpers (``web``), crafted archives (``malicious_tars``), hostile media
(``hostile_media``), headless Chromium (``browser_kit``), what Ansible would render
(``ansible_render``) and the worker kit (``workerkit``: a test queue worker and
helpers to run workers as processes)."""
