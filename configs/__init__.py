"""sorajax's configs, importable (`from configs import wan2_1_t2v_1p3b`) so that one config can
start from another without path tricks. Each file's docstring is its launch command; every key
it sets is declared in sorajax/config_base.py."""
