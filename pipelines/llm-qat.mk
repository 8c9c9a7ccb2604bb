# LLM-QAT pipeline: data-free teacher shards -> QAT students -> perplexity, plus FP and RTN
# baselines and a Markdown report.
#
# Every stage's target is a file that appears only when the stage has finished (tools write
# to temporaries and rename), so an interrupted stage is rerun (and resumes: qat-sample keeps
# verified files, qat-distill continues from its checkpoint) and a finished one is never redone.
# The shard directory is a cached prerequisite shared by all students of the same teacher and
# sampling settings: adding a student reuses it without resampling.
#
#   make -f pipelines/llm-qat.mk BIN=target/release QAT_DATA=../shared/data OUT=out
#   make -f pipelines/llm-qat.mk STUDENTS="W4A8KV8" -j2    # one more student, same shards
#   make -f pipelines/llm-qat.mk CLIP=0 TOPK=64 LR=1e-3    # teacher init, top-64 shards

# stories260K's vocabulary has 512 tokens, so K = 512 keeps the teacher's exact distribution
# (1.1 GB of shards); for a 32k vocabulary use TOPK=64 (the shards.mk default).
TOPK ?= 512
include pipelines/shards.mk
.DEFAULT_GOAL := all

# Students and the training recipe.
STUDENTS ?= W4 W4A8KV8 W4A8KV4
# 1: start each student from qat-clip's clipped weights (its own scheme, q/k included);
# 0: from the teacher.
CLIP ?= 1
EPOCHS ?= 1
LR ?= 2e-4
BATCH ?= 16
# Extra qat-distill flags; name them in TAG so that different recipes get different directories.
DISTILL_FLAGS ?= --balance-kv 64
TAG ?= -bal64
CLIP_TAG := $(if $(filter 1,$(CLIP)),-clipqk,)
RECIPE := $(SHARD_NAME)-e$(EPOCHS)-lr$(LR)$(TAG)$(CLIP_TAG)
STUDENT_DIR := $(OUT)/students/$(RECIPE)

init_model = $(if $(filter 1,$(CLIP)),$(CLIPPED)/$(1)-qk,$(MODEL))
init_dep = $(if $(filter 1,$(CLIP)),$(CLIPPED)/$(1)-qk/model.safetensors,$(MODEL_STAMP))

.PHONY: all shards clipped students report
all: report
shards: $(SHARDS).summary.json
# Named explicitly so that make does not treat the clipped models as intermediate files of the
# pattern rules (it would delete them after every run and clip again on the next).
clipped: $(if $(filter 1,$(CLIP)),$(foreach s,$(STUDENTS),$(CLIPPED)/$(s)-qk/model.safetensors))
students: $(foreach s,$(STUDENTS),$(STUDENT_DIR)/$(s)/model.safetensors)

# A student directory appears (renamed into place) only when training has finished.
.SECONDEXPANSION:
$(STUDENT_DIR)/%/model.safetensors: $(SHARDS).summary.json $$(call init_dep,$$*)
	@mkdir -p $(STUDENT_DIR)
	$(BIN)/qat-distill --model $(call init_model,$*) --shards $(SHARDS) --out $(STUDENT_DIR)/$* \
	    --scheme $(call scheme_arg,$*) --epochs $(EPOCHS) --lr $(LR) -b $(BATCH) --seed $(SEED) --resume \
	    $(DISTILL_FLAGS) $(DEVICE_FLAGS) > $(STUDENT_DIR)/$*.distill.json

$(EVAL)/qat-$(RECIPE)-%.json: $(STUDENT_DIR)/%/model.safetensors $(CORPUS_STAMP)
	@mkdir -p $(dir $@)
	$(BIN)/qat-eval --model $(STUDENT_DIR)/$* $(EVAL_FLAGS) > $@.tmp
	mv $@.tmp $@

# llama.cpp (`make pipeline-gguf`, or `make -f pipelines/llm-qat.mk gguf`): the weight-only
# students (per channel, or on a GGUF grid) as GGUF files, and their perplexity in llama.cpp itself
# on the tokens qat-eval scores (tests/foreign/llama_cpp_nll.py --score-ids; llama.cpp's own
# tokenizer ignores the tokenizer's remove_extra_whitespaces, formats/gguf.md). Needs the test
# venv with llama-cpp-python (`make test-deps`).
GGUF_STUDENTS ?= $(foreach s,$(STUDENTS),$(if $(findstring A,$(s))$(findstring KV,$(s)),,$(s)))
# GGUF_FLOAT=f16 or bf16 stores the embeddings and unquantized layers in that type
# (qat-pack --gguf-float), in files and results of their own.
GGUF_FLOAT ?= f32
GGUF_TAG := $(RECIPE)$(if $(filter-out f32,$(GGUF_FLOAT)),-$(GGUF_FLOAT))
GGUF_DIR := $(OUT)/gguf/$(GGUF_TAG)
LLAMA_CPP_PYTHON ?= .venv/bin/python
.PHONY: gguf
gguf: $(foreach s,$(GGUF_STUDENTS),$(EVAL)/llama-cpp-$(GGUF_TAG)-$(s).json)
	@for s in $(GGUF_STUDENTS); do printf '%s: qat-eval ppl %s, llama.cpp ppl %s (%s)\n' $$s \
	    "$$(python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["ppl"], 4))' $(EVAL)/qat-$(RECIPE)-$$s.json)" \
	    "$$(python3 -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["ppl"], 4))' $(EVAL)/llama-cpp-$(GGUF_TAG)-$$s.json)" \
	    $(GGUF_DIR)/$$s.gguf; done

# (Kept: not an intermediate file of the perplexity rule below.)
.PRECIOUS: $(GGUF_DIR)/%.gguf
$(GGUF_DIR)/%.gguf: $(STUDENT_DIR)/%/model.safetensors
	@mkdir -p $(GGUF_DIR)
	rm -f $@
	$(BIN)/qat-pack --format gguf --gguf-float $(GGUF_FLOAT) -m $(STUDENT_DIR)/$* -o $@ > $@.json

# The token ids every perplexity of this corpus scores (the same for every model of this
# tokenizer), from a full-precision qat-eval run.
$(EVAL)/ids.json: $(MODEL_STAMP) $(CORPUS_STAMP)
	@mkdir -p $(dir $@)
	$(BIN)/qat-eval --model $(MODEL) $(EVAL_FLAGS) --scheme FP --ids-out $@ > $@.eval.json

$(EVAL)/llama-cpp-$(GGUF_TAG)-%.json: $(GGUF_DIR)/%.gguf $(EVAL)/ids.json $(EVAL)/qat-$(RECIPE)-%.json
	$(LLAMA_CPP_PYTHON) tests/foreign/llama_cpp_nll.py $< $(EVAL_CORPUS) --seq-len $(SEQ_LEN) \
	    --ids $(EVAL)/ids.json --score-ids > $@.tmp
	mv $@.tmp $@

# W4A8KV4 by a bit curriculum (README, "What mattered"): starting from this recipe's W4A8KV8
# student, each stage trains the previous stage's student at fewer KV bits.
#   make -f pipelines/llm-qat.mk curriculum
# Stages are scheme:epochs:lr; every stage gets its own directory, so an interrupted run resumes.
# Another chain needs its own CURRICULUM_TAG (it names the directories and the report), e.g. the
# per-head KV scales: CURRICULUM="W4A8KV6H:1:5e-4 W4A8KV5H:1:5e-4 W4A8KV4H:2:5e-4" CURRICULUM_TAG=kvh.
# CURRICULUM_FROM names the student the chain starts from (default this recipe's W4A8KV8), or
# `teacher`: the teacher itself, whose first stage then also gets DISTILL_FLAGS (the K/V
# rebalancing the W4A8KV8 student had). E.g. the KV cache alone (README, "Session 7"):
# CURRICULUM="KV6H:1:5e-4 KV5H:1:5e-4 KV4H:2:5e-4" CURRICULUM_FROM=teacher CURRICULUM_TAG=kvonly-h.
CURRICULUM ?= W4A8KV6:1:5e-4 W4A8KV5:1:5e-4 W4A8KV4:2:5e-4 W4A8KV4:2:2e-4
CURRICULUM_TAG ?= kvcurriculum
CURRICULUM_FROM ?= W4A8KV8
from_teacher := $(filter teacher,$(CURRICULUM_FROM))
CURRICULUM_DIR := $(OUT)/students/$(RECIPE)-$(CURRICULUM_TAG)
stage_field = $(word $(2),$(subst :, ,$(1)))
stage_numbers := $(shell seq 1 $(words $(CURRICULUM)))
stage_names := $(foreach i,$(stage_numbers),$(i)-$(call stage_field,$(word $(i),$(CURRICULUM)),1))
stage_dirs := $(addprefix $(CURRICULUM_DIR)/,$(stage_names))
stage_inits := $(if $(from_teacher),$(MODEL),$(STUDENT_DIR)/$(CURRICULUM_FROM)) $(stage_dirs)
# What each stage waits for: the model it starts from (the teacher's stamp for the teacher).
stage_init_deps := $(if $(from_teacher),$(MODEL_STAMP),$(STUDENT_DIR)/$(CURRICULUM_FROM)/model.safetensors) \
    $(addsuffix /model.safetensors,$(stage_dirs))
CURRICULUM_FINAL := $(lastword $(stage_dirs))
# The scheme of the last stage: the curriculum student's scheme (its row and RTN baseline).
CURRICULUM_SCHEME := $(call stage_field,$(lastword $(CURRICULUM)),1)

# $(1): stage directory, $(2): scheme:epochs:lr, $(3): directory of the model it starts from,
# $(4): that model's completion file, $(5): extra qat-distill flags.
define curriculum_stage
$(1)/model.safetensors: $(4) $(SHARDS).summary.json
	@mkdir -p $(CURRICULUM_DIR)
	$(BIN)/qat-distill --model $(3) --shards $(SHARDS) --out $(1) --scheme $(call stage_field,$(2),1) \
	    --epochs $(call stage_field,$(2),2) --lr $(call stage_field,$(2),3) -b $(BATCH) --seed $(SEED) --resume \
	    $(5) $(DEVICE_FLAGS) > $(1).distill.json
endef
$(foreach i,$(stage_numbers),$(eval $(call curriculum_stage,$(word $(i),$(stage_dirs)),$(word $(i),$(CURRICULUM)),$(word $(i),$(stage_inits)),$(word $(i),$(stage_init_deps)),$(if $(and $(from_teacher),$(filter 1,$(i))),$(DISTILL_FLAGS)))))

CURRICULUM_EVAL := $(EVAL)/qat-$(RECIPE)-$(CURRICULUM_TAG).json
$(CURRICULUM_EVAL): $(CURRICULUM_FINAL)/model.safetensors $(CORPUS_STAMP)
	@mkdir -p $(dir $@)
	$(BIN)/qat-eval --model $(CURRICULUM_FINAL) $(EVAL_FLAGS) > $@.tmp
	mv $@.tmp $@

# report.py's row for the curriculum student: its stage directories, as named above.
curriculum_row = --curriculum $(CURRICULUM_SCHEME) $(EVAL)/rtn-$(CURRICULUM_SCHEME).json $(CURRICULUM_EVAL) "$(stage_dirs)" "$(CURRICULUM)" \
    --curriculum-from $(CURRICULUM_FROM)
CURRICULUM_REPORT := $(OUT)/report-$(RECIPE)-$(CURRICULUM_TAG).md
.PHONY: curriculum
curriculum: $(CURRICULUM_REPORT)
	@cat $(CURRICULUM_REPORT)
$(CURRICULUM_REPORT): $(EVAL)/fp.json $(EVAL)/rtn-$(CURRICULUM_SCHEME).json $(CURRICULUM_EVAL)
	python3 pipelines/report.py --fp $(EVAL)/fp.json --shards $(SHARDS) \
	    $(curriculum_row) > $@.tmp
	mv $@.tmp $@

# With W4A8KV4 and W4A8KV8 among the students, the report also has the W4A8KV4 student of the
# bit curriculum below (the best recipe for 4-bit KV; CURRICULUM_IN_REPORT=0 leaves it out).
CURRICULUM_IN_REPORT ?= 1
with_curriculum := $(and $(filter 1,$(CURRICULUM_IN_REPORT)),$(filter W4A8KV4,$(STUDENTS)),$(filter W4A8KV8,$(STUDENTS)))
REPORT := $(OUT)/report-$(RECIPE).md
report: $(REPORT)
	@cat $(REPORT)
$(REPORT): $(EVAL)/fp.json $(foreach s,$(STUDENTS),$(EVAL)/rtn-$(s).json $(EVAL)/qat-$(RECIPE)-$(s).json) \
    $(if $(with_curriculum),$(EVAL)/rtn-$(CURRICULUM_SCHEME).json $(CURRICULUM_EVAL))
	python3 pipelines/report.py --fp $(EVAL)/fp.json --shards $(SHARDS) \
	    $(foreach s,$(STUDENTS),--student $(s) $(EVAL)/rtn-$(s).json $(EVAL)/qat-$(RECIPE)-$(s).json $(STUDENT_DIR)/$(s)) \
	    $(if $(with_curriculum),$(curriculum_row)) > $@.tmp
	mv $@.tmp $@
