"""What the tests share: the local-stack fixtures (``stack``, loaded as a pytest plugin
by tests/conftest.py), row factories for the pipeline's tables (``rows``), the RA
app's test helpers (``web``), crafted archives (``malicious_tars``), hostile media
(``hostile_media``), headless Chromium (``browser_kit``) and what Ansible would
render (``ansible_render``). The worker test kit lives in tests/workerkit."""
