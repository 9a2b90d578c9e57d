"""The run config: its parser and checks (``parser``), the configs shipped with bptt (``packaged``) and the
allow-list of import paths a config may name (``trust``)."""
