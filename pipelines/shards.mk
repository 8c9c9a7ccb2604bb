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
# `--checkpoint $@.ckpt`: an interrupted evaluation (hours for a large model on a CPU) continues
# from its last batch when make runs the stage again.
EVAL_FLAGS = --corpus $(EVAL_CORPUS) --mode docs --seq-len $(SEQ_LEN) --checkpoint $@.ckpt $(DEVICE_FLAGS)

# Scheme argument for a student name: a JSON file pipelines/schemes/<model>/<name>.json if there
# is one (e.g. group sizes adapted to the model's shapes), else the short name itself.
scheme_arg = $(or $(wildcard pipelines/schemes/$(MODEL_NAME)/$(1).json),$(1))

.DELETE_ON_ERROR:

# Content stamps: stages depend on the sha256 of their inputs, not on the inputs' mtimes, so a
# data directory copied or mounted anew (new mtimes, same bytes) keeps every cached stage. The
# stamp is rewritten, and its dependents redone, only when the bytes change. A stamp made for the
# first time is dated 1970, so that an OUT directory from before the stamps keeps its stages.
update_stamp = if [ ! -f $@ ]; then mv $@.tmp $@ && touch -d @0 $@; elif cmp -s $@.tmp $@; then rm $@.tmp; else mv $@.tmp $@; fi
STAMPS := $(OUT)/stamps
MODEL_STAMP := $(STAMPS)/model-$(MODEL_NAME).sha256
CORPUS_STAMP := $(STAMPS)/corpus-$(notdir $(EVAL_CORPUS)).sha256
$(MODEL_STAMP): FORCE
	@mkdir -p $(dir $@)
	@cd $(MODEL) && sha256sum model.safetensors config.json tokenizer.json > $(abspath $@).tmp
	@$(update_stamp)
$(CORPUS_STAMP): FORCE
	@mkdir -p $(dir $@)
	@sha256sum < $(EVAL_CORPUS) > $@.tmp
	@$(update_stamp)
.PHONY: FORCE
FORCE:

# qat-sample's JSON summary is the stage's completion stamp.
$(SHARDS).summary.json: $(MODEL_STAMP)
	@mkdir -p $(dir $@)
	$(BIN)/qat-sample --model $(MODEL) --out $(SHARDS) -n $(NUM_SEQ) --max-len $(MAX_LEN) \
	    -K $(TOPK) --seed $(SEED) --batch-size $(SAMPLE_BATCH) $(DEVICE_FLAGS) > $@.tmp
	mv $@.tmp $@

$(EVAL)/fp.json: $(MODEL_STAMP) $(CORPUS_STAMP)
	@mkdir -p $(dir $@)
	$(BIN)/qat-eval --model $(MODEL) $(EVAL_FLAGS) --scheme FP > $@.tmp
	mv $@.tmp $@

# Round-to-nearest baseline: the teacher under the scheme, no training.
$(EVAL)/rtn-%.json: $(MODEL_STAMP) $(CORPUS_STAMP)
	@mkdir -p $(dir $@)
	$(BIN)/qat-eval --model $(MODEL) $(EVAL_FLAGS) --scheme $(call scheme_arg,$*) > $@.tmp
	mv $@.tmp $@

# qat-clip's clipping search of the teacher for a scheme (BitDistiller's initialization), on
# the shards' sequences: $(CLIPPED)/<scheme>/ clips BitDistiller's layers (q and k left as they
# are), $(CLIPPED)/<scheme>-qk/ every linear layer (LLM-QAT's students start from it). Make
# picks the rule with the shorter stem, so a `-qk` directory takes the first.
CLIPPED := $(OUT)/clipped/$(SHARD_NAME)
$(CLIPPED)/%-qk/model.safetensors: $(SHARDS).summary.json
	@mkdir -p $(CLIPPED)
	$(BIN)/qat-clip --model $(MODEL) --shards $(SHARDS) --scheme $(call scheme_arg,$*) --include-qk \
	    --out $(CLIPPED)/$*-qk -q $(DEVICE_FLAGS) > $(CLIPPED)/$*-qk.clip.json
$(CLIPPED)/%/model.safetensors: $(SHARDS).summary.json
	@mkdir -p $(CLIPPED)
	$(BIN)/qat-clip --model $(MODEL) --shards $(SHARDS) --scheme $(call scheme_arg,$*) \
	    --out $(CLIPPED)/$* -q $(DEVICE_FLAGS) > $(CLIPPED)/$*.clip.json
