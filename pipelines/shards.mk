# Shared by the pipelines: the teacher, its data-free shard set (a cached prerequisite: every
# pipeline and student with the same teacher and sampling settings reuses the same directory),
# the evaluation corpus and the full-precision baseline.
#
# Include it after setting nothing (all variables have defaults) or override on the command line.

QAT_DATA ?= ../shared/data
BIN ?= target/release
OUT ?= out
MODEL ?= $(QAT_DATA)/models/stories260K
MODEL_NAME ?= $(notdir $(MODEL))
# Passed to every tool, e.g. DEVICE_FLAGS="--device cuda" (bench/gpu/run.sh pipeline); use another OUT.
DEVICE_FLAGS ?=

# Sampling (LLM-QAT: greedy 3..5 tokens from each vocabulary token, then T = 1 sampling).
NUM_SEQ ?= 4096
MAX_LEN ?= 256
TOPK ?= 64
SEED ?= 0
SAMPLE_BATCH ?= 64
SHARD_NAME ?= $(MODEL_NAME)-n$(NUM_SEQ)-len$(MAX_LEN)-k$(TOPK)-s$(SEED)
SHARDS := $(OUT)/shards/$(SHARD_NAME)

# Evaluation (docs mode: each story is BOS + text, truncated to SEQ_LEN tokens).
EVAL_CORPUS ?= $(QAT_DATA)/corpora/tinystories/TinyStories-valid.first800.txt
SEQ_LEN ?= 512
EVAL := $(OUT)/eval/$(MODEL_NAME)
EVAL_FLAGS = --corpus $(EVAL_CORPUS) --mode docs --seq-len $(SEQ_LEN) $(DEVICE_FLAGS)

# Scheme argument for a student name: a JSON file pipelines/schemes/<model>/<name>.json if there
# is one (e.g. group sizes adapted to the model's shapes), else the short name itself.
scheme_arg = $(or $(wildcard pipelines/schemes/$(MODEL_NAME)/$(1).json),$(1))

.DELETE_ON_ERROR:

# qat-sample's JSON summary is the stage's completion stamp.
$(SHARDS).summary.json: $(MODEL)/model.safetensors $(MODEL)/config.json $(MODEL)/tokenizer.json
	@mkdir -p $(dir $@)
	$(BIN)/qat-sample --model $(MODEL) --out $(SHARDS) -n $(NUM_SEQ) --max-len $(MAX_LEN) \
	    -K $(TOPK) --seed $(SEED) --batch-size $(SAMPLE_BATCH) $(DEVICE_FLAGS) > $@.tmp
	mv $@.tmp $@

$(EVAL)/fp.json: $(MODEL)/model.safetensors $(EVAL_CORPUS)
	@mkdir -p $(dir $@)
	$(BIN)/qat-eval --model $(MODEL) $(EVAL_FLAGS) --scheme FP > $@.tmp
	mv $@.tmp $@

# Round-to-nearest baseline: the teacher under the scheme, no training.
$(EVAL)/rtn-%.json: $(MODEL)/model.safetensors $(EVAL_CORPUS)
	@mkdir -p $(dir $@)
	$(BIN)/qat-eval --model $(MODEL) $(EVAL_FLAGS) --scheme $(call scheme_arg,$*) > $@.tmp
	mv $@.tmp $@
