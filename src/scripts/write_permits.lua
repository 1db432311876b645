-- write_permits.lua: a batch's permits and ACKs, atomically (SPEC §4-§6).
--
-- KEYS     per entry i, two keys:
--            KEYS[2i-1]  quantum:permit:p33:<plan_id>    (written)
--            KEYS[2i]    quantum:reconcile:hold:<symbol> (read)
--          An ACK-only entry fills both slots with unused names.
-- ARGV[1]  the plan stream
-- ARGV[2]  the consumer group
-- ARGV[3]  the permit TTL, ms
-- ARGV     then per entry i, four values from ARGV[4 + 4(i-1)]:
--            entry ID, mode, permit body, hold-deny body
--          mode '0' = ACK only, '1' = permit, '2' = permit unless held
--          (the hold-deny body replaces the permit when the hold key holds a
--          non-empty string or any other type).
--
-- Returns one code per entry:
--   0  the entry was not pending any more (another consumer finished it):
--      nothing written
--   1  ACKed, no permit (as asked)
--   2  ACKed, permit written as evaluated
--   3  ACKed, hold denial written instead of the allow
--   4  ACKed, nothing written: a permit for this plan_id already exists
--      (an earlier entry with the same id); a permit is never overwritten
--
-- The ACK comes first and a permit is written only when it removed a pending
-- entry, so no plan is ever permitted twice.

local stream, group, ttl = ARGV[1], ARGV[2], ARGV[3]
local out = {}
local n = (#ARGV - 3) / 4
for i = 1, n do
  local a = 3 + (i - 1) * 4
  local id, mode = ARGV[a + 1], ARGV[a + 2]
  local acked = redis.call('XACK', stream, group, id)
  if acked == 0 then
    out[i] = 0
  elseif mode == '0' then
    out[i] = 1
  elseif redis.call('EXISTS', KEYS[2 * i - 1]) == 1 then
    out[i] = 4
  else
    local body, res = ARGV[a + 3], 2
    if mode == '2' then
      local hk = KEYS[2 * i]
      local t = redis.call('TYPE', hk).ok
      local held = false
      if t == 'string' then
        held = string.len(redis.call('GET', hk)) > 0
      elseif t ~= 'none' then
        held = true
      end
      if held then body, res = ARGV[a + 4], 3 end
    end
    redis.call('SET', KEYS[2 * i - 1], body, 'PX', ttl, 'NX')
    out[i] = res
  end
end
return out
