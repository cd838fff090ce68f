"""Names of the records and metrics that travel between sites and the server, defined once."""

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"

# ConfigRecord keys sent by the server
FEDERATION_CONFIG = "fedsynth-config"
SERVER_ROUND = "server-round"

# MetricRecord keys sent by a site (numbers only)
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
VAL_LOSS = "val-loss"
VAL_EXAMPLES = "val-num-examples"  # in a train reply, where num-examples counts training patients
EPSILON = "epsilon"
DELTA = "delta"
STEPS = "steps"

# ConfigRecord key of a site reply: the site's public name, chosen by the hospital
SITE_ID = "site-id"

# run_config keys ([tool.flwr.app.config] in pyproject.toml)
RUN_CONFIG_PATH = "config"
RUN_SIM_SITES = "sim-site-configs"

# node_config keys (flower-supernode --node-config)
NODE_SITE_CONFIG = "site-config"
NODE_PARTITION_ID = "partition-id"
NODE_NUM_THREADS = "num-threads"

# Error codes of a site's error reply (Flower's own codes are below 100)
ERROR_PRIVACY_BUDGET = 101
ERROR_SITE_DATA = 102
ERROR_CONFIG = 103
ERROR_POLICY = 104
ERROR_INTERNAL = 199
