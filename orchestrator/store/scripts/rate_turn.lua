-- One request of a key's request budget (GCRA: ``tat`` is the key's theoretical arrival time; a
-- pause (Retry-After) may have pushed it forward, which also holds back keys without an rpm).
-- For a submission (ARGV[4], a job id) a job that must wait joins the key's
-- budget line (priority, then submission order) and is told to come back when its turn should come
-- (its place in line times the interval), so ten thousand waiting jobs retry about once each, not
-- every interval. The line only spreads the retries: whoever finds a free request takes it.
-- Returns {0} when the request may go now, else {milliseconds to wait, place in line}.
-- KEYS: 1 rate, 2 budget line; ARGV: 1 now ms, 2 interval ms, 3 burst ms, 4 job id or '', 5 line score
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or ARGV[1])
if tat < now then tat = now end
local allow_at = tat - burst
if interval == 0 then allow_at = tat end
if now >= allow_at then
  if interval > 0 then
    redis.call('SET', KEYS[1], tat + interval, 'PX', math.ceil(burst + 2 * interval))
  end
  redis.call('ZREM', KEYS[2], ARGV[4])
  return {0, 0}
end
if ARGV[4] == '' then return {allow_at - now, 0} end
redis.call('ZADD', KEYS[2], 'NX', ARGV[5], ARGV[4])
local place = redis.call('ZRANK', KEYS[2], ARGV[4])
return {allow_at - now + place * interval, place}
