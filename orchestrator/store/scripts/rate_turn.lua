-- One request of a key's request budget (GCRA: ``tat`` is the key's theoretical arrival time; a
-- pause (Retry-After) may have pushed it forward, which also holds back keys without an rpm).
-- For a submission (ARGV[4], a job id) a job that must wait joins the key's budget line and is
-- told to come back when its turn should come (its place in line times the interval), so ten
-- thousand waiting jobs retry about once each, not every interval. The line only spreads the
-- retries: whoever finds a free request takes it.
-- The line is ordered as the slot line is (slot_acquire.lua): priority, then fair-share tags
-- between tenants (one tenant's big batch puts another's job about one turn back, not thousands),
-- then arrival. Score = rank * 1e13 + tag * 1e6 + arrival (mod 1e6).
-- Returns {0} when the request may go now, else {milliseconds to wait, place in line}.
-- KEYS: 1 rate, 2 budget line, 3 the line's fair-share tags
-- ARGV: 1 now ms, 2 interval ms, 3 burst ms, 4 job id or '', 5 priority rank, 6 tenant
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local rank = tonumber(ARGV[5])
local tat = tonumber(redis.call('GET', KEYS[1]) or ARGV[1])
if tat < now then tat = now end
local allow_at = tat - burst
if interval == 0 then allow_at = tat end
if now >= allow_at then
  if interval > 0 then
    redis.call('SET', KEYS[1], tat + interval, 'PX', math.ceil(burst + 2 * interval))
  end
  if ARGV[4] ~= '' then
    local score = redis.call('ZSCORE', KEYS[2], ARGV[4])
    if score then
      local tag = math.floor((tonumber(score) - rank * 1e13) / 1e6)
      local vt = tonumber(redis.call('HGET', KEYS[3], 'vt:' .. rank) or '0')
      if tag > vt then redis.call('HSET', KEYS[3], 'vt:' .. rank, tag) end
      redis.call('ZREM', KEYS[2], ARGV[4])
      if redis.call('ZCARD', KEYS[2]) == 0 then redis.call('DEL', KEYS[3]) end
    end
  end
  return {0, 0}
end
if ARGV[4] == '' then return {allow_at - now, 0} end
if not redis.call('ZSCORE', KEYS[2], ARGV[4]) then
  if redis.call('ZCARD', KEYS[2]) == 0 then redis.call('DEL', KEYS[3]) end
  local vt = tonumber(redis.call('HGET', KEYS[3], 'vt:' .. rank) or '0')
  local ft = tonumber(redis.call('HGET', KEYS[3], 't:' .. rank .. ':' .. ARGV[6]) or '0')
  local tag = math.max(vt, ft)
  redis.call('HSET', KEYS[3], 't:' .. rank .. ':' .. ARGV[6], tag + 1)
  local seq = redis.call('HINCRBY', KEYS[3], 'seq', 1) % 1000000
  redis.call('ZADD', KEYS[2], string.format('%.0f', rank * 1e13 + tag * 1e6 + seq), ARGV[4])
end
local place = redis.call('ZRANK', KEYS[2], ARGV[4])
return {allow_at - now + place * interval, place}
