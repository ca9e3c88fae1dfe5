# Builds one binary service; included by services/<name>/Makefile after it sets NAME and USES.
#
#   make -f services/<name>/Makefile DEPS=<deps dir> OUT=<out dir> [PORT=<port>] [BUILD=<dir>]
#
# compiles services/<name>/*.c and services/common/*.c into BUILD/<name>/ (default build/<name>,
# relative to the current directory, never inside the source tree) and links OUT/<name> against
# DEPS/lib/lib<x>.a for each x in USES, with the headers of DEPS/include.
# Each compile prints "CC <object>", the link "LD <binary>".

ifndef NAME
$(error the service Makefile must set NAME)
endif
ifndef DEPS
$(error set DEPS to the built dependency layer (the directory holding include/ and lib/))
endif
ifndef OUT
$(error set OUT to the directory the binary goes to)
endif

SERVICES_DIR := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))
SRC_DIR := $(SERVICES_DIR)/$(NAME)
COMMON_DIR := $(SERVICES_DIR)/common

CC ?= cc
CFLAGS ?= -O2
PORT ?= 0
BUILD ?= build
OBJ_DIR := $(BUILD)/$(NAME)
BIN := $(OUT)/$(NAME)
LIBFILES := $(patsubst %,$(DEPS)/lib/lib%.a,$(USES))
comma := ,
empty :=
space := $(empty) $(empty)
DEFS := -DSERVICE_NAME='"$(NAME)"' -DSERVICE_PORT=$(PORT) \
	-DSERVICE_LIBS='"$(subst $(space),$(comma),$(strip $(USES)))"'
CPPFLAGS += -I$(DEPS)/include -I$(COMMON_DIR)
SRCS := $(wildcard $(SRC_DIR)/*.c) $(wildcard $(COMMON_DIR)/*.c)
OBJS := $(patsubst %.c,$(OBJ_DIR)/%.o,$(notdir $(SRCS)))

# The compile flags are part of what an object depends on: FLAGS changes when they do.
FLAGS := $(OBJ_DIR)/flags
FLAGS_TEXT := $(CC) $(CPPFLAGS) $(CFLAGS) $(DEFS)
ifneq ($(file <$(FLAGS)),$(FLAGS_TEXT))
$(shell mkdir -p $(OBJ_DIR))
$(file >$(FLAGS),$(FLAGS_TEXT))
endif

vpath %.c $(SRC_DIR) $(COMMON_DIR)

.PHONY: all
.DELETE_ON_ERROR:

all: $(BIN)

$(OBJ_DIR)/%.o: %.c $(FLAGS)
	@mkdir -p $(@D)
	@echo "CC $@"
	@$(CC) $(CPPFLAGS) $(CFLAGS) $(DEFS) -Wall -Wextra -MMD -MP -c -o $@ $<

$(BIN): $(OBJS) $(LIBFILES)
	@mkdir -p $(@D)
	@echo "LD $@"
	@$(CC) $(CFLAGS) -o $@ $(OBJS) -L$(DEPS)/lib -Wl,--start-group $(USES:%=-l%) -Wl,--end-group

-include $(OBJS:.o=.d)
