# shellcheck shell=bash disable=SC2154  # $dry_run is set by the sourcing script
# Helpers sourced by the launch scripts (needs $dry_run: 1 prints commands, 0 runs them).

quote() {  # the arguments as one shell line, quoting only those that need it
  local arg line=""
  for arg in "$@"; do
    if [[ "$arg" =~ ^[][A-Za-z0-9_./=:,@%+-]+$ ]]; then line+="$arg "; else line+="${arg@Q} "; fi
  done
  echo "${line% }"
}

run() {  # prints the command; runs it unless --dry-run
  quote "$@"
  if [[ $dry_run -eq 0 ]]; then "$@"; fi
}
