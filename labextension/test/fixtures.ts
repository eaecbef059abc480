import { ISession } from '../src/tokens';

/** A session as the service answers it; `over` changes fields. */
export function session(over: Partial<ISession> = {}): ISession {
  return {
    name: 'alice/mnist/1',
    id: 1,
    user: 'alice',
    state: 'running',
    visibility: 'private',
    entry: 'train.py',
    args: ['--lr', '0.1'],
    image: 'img',
    datasets: ['mnist@1'],
    resources: { gpus: 1, gpu_models: [], cpu: 1, memory_mib: 1024 },
    node: 'local',
    gpu_ids: ['0'],
    gpu_use: [],
    exit_code: null,
    reason: null,
    message: null,
    queue: null,
    stop_requested: false,
    parent: null,
    parent_checkpoint: null,
    memo: '',
    last_step: null,
    last_metrics: {},
    created: '2026-01-01T00:00:00Z',
    started: '2026-01-01T00:00:10Z',
    finished: null,
    duration_s: null,
    ...over
  };
}
