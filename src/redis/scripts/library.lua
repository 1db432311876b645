#!lua name=__LIBRARY__
-- library.lua: the function library the daemon installs (SPEC §17), so that
-- ctl's user (p33-ops) runs only code a gate put in Redis (FCALL), with no
-- EVAL and no SCRIPT LOAD of its own. Its one function is change_state.lua
-- (common.lua in front), unchanged: KEYS and ARGV are its arguments. The
-- names carry the SHA1 of that code, so ctl calls exactly the code of its
-- own version, and instances of two versions never replace each other's
-- library. allow-oom: a halt must go through while Redis is out of memory.
redis.register_function{
  function_name = '__FUNCTION__',
  flags = {'allow-oom'},
  callback = function(KEYS, ARGV)
__BODY__
  end,
}
